"""Tasks sharded over 4 simulated CPU devices give the meta-state of the single-device run.

JAX fixes its device count when its backend starts, so the 4-device checks run in a fresh
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import hiermeta as hm
from hiermeta.sharding import shard_tasks, task_mesh
from hiermeta.models import linear

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    import hiermeta as hm
    from hiermeta.sharding import shard_tasks, sharded_step, task_mesh
    from hiermeta.models import linear, sinusoid
    import sys
    hm.enable_compilation_cache(sys.argv[1])

    assert jax.device_count() == 4, jax.devices()
    mesh = task_mesh()

    def close(a, b, what):
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-9, atol=1e-12, err_msg=what)

    paper = linear.paper_domain()
    sine = sinusoid.maml_domain()
    cases = {
        "linear M-Shrinkage": (
            hm.m_shrinkage(linear.make_model(8), inner_optimizer=optax.sgd(0.3), inner_steps=20,
                           outer_optimizer=optax.adam(0.03)),
            jnp.zeros(8), lambda key: linear.sample_tasks(paper, key, 25)[1]),
        "sinusoid M-Shrinkage": (
            hm.m_shrinkage(sinusoid.make_model(), inner_optimizer=optax.sgd(0.002), inner_steps=5,
                           outer_optimizer=optax.adam(1e-3)),
            sinusoid.init_mlp(jax.random.PRNGKey(0)), lambda key: sinusoid.sample_tasks(sine, key, 25)[1]),
    }
    for name, (learner, params, sample) in cases.items():
        state = learner.init(jax.random.PRNGKey(0), params)
        batch = sample(jax.random.PRNGKey(1))           # 25 tasks: an uneven split over 4 devices
        one, m1 = jax.jit(learner.step)(state, batch)
        compiled = sharded_step(learner.step, mesh).lower(state, batch).compile()
        hlo = compiled.as_text()
        assert "num_partitions=4" in hlo and "all-reduce" in hlo, name + ": the step is not partitioned"
        many, m4 = compiled(state, batch)
        close(one, many, name + ": one step")
        close(m1, m4, name + ": metrics")
        assert many.params["phi"].sharding.is_fully_replicated
        assert len(many.params["phi"].sharding.device_set) == 4
        print("ok", name, float(jnp.max(jnp.abs(one.params["phi"] - many.params["phi"]))))

    # whole training runs: fit with and without the mesh
    learner, params, sample = cases["linear M-Shrinkage"]
    state, key = learner.init(jax.random.PRNGKey(0), params), jax.random.PRNGKey(2)
    s1, h1 = hm.fit(learner, state, sample, 12, data_key=key, chunk_size=6, progress=False)
    s4, h4 = hm.fit(learner, state, sample, 12, data_key=key, chunk_size=6, progress=False, mesh=mesh)
    close(s1, s4, "fit")
    close(h1, h4, "history")
    assert int(s4.step) == 12 and int(s4.num_skipped) == 0
    assert len(s4.params["phi"].sharding.device_set) == 4
    print("ok fit", float(jnp.max(jnp.abs(s1.params["phi"] - s4.params["phi"]))))

    # concrete batches outside jit: an even split places 6 tasks on each device
    batch = shard_tasks(linear.sample_tasks(paper, jax.random.PRNGKey(3), 24)[1], mesh)
    assert [s.data.shape for s in batch.train.obs.addressable_shards] == [(6, 4, 9)] * 4
    try:
        shard_tasks(linear.sample_tasks(paper, jax.random.PRNGKey(3), 25)[1], mesh)
        raise AssertionError("an uneven concrete batch was accepted")
    except ValueError as err:
        assert "25 tasks does not split evenly over 4 devices" in str(err), err
    print("ALL OK")
    """
)


@pytest.mark.slow  # tests/test_multiprocess.py runs a 4-device mesh (2 processes x 2 devices) against one device in the default suite
def test_sharded_training_on_4_devices_matches_one_device(tmp_path):
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count", "--ignored")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4".strip()
    env["JAX_PLATFORMS"] = "cpu"
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
    script = tmp_path / "four_devices.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script), cache], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ALL OK" in out.stdout and out.stdout.count("ok ") == 3, out.stdout


def test_one_device_mesh_runs_the_same_code(paper):
    mesh = task_mesh(num_devices=1)
    batch = shard_tasks(linear.sample_tasks(paper, jax.random.PRNGKey(0), 5)[1], mesh)
    assert batch.train.obs.sharding.mesh.devices.size == 1
    with pytest.raises(ValueError, match="num_devices must be between 1 and"):
        task_mesh(num_devices=jax.device_count() + 1)
    with pytest.raises(ValueError, match="leading task axis"):
        shard_tasks({"x": np.float64(1.0)}, mesh)
    assert hm.sharding.TASK_AXIS == "tasks"
