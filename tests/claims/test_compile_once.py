"""Compile once: repeated meta-steps, fits and evaluations do not retrace; a second process
starts from JAX's persistent compilation cache (as the examples do)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import optax

import hiermeta as hm
from hiermeta.models import sinusoid

ROOT = Path(__file__).resolve().parents[2]


class Counter:
    def __init__(self):
        self.n = 0

    def wrap(self, fn):
        def counted(*args, **kwargs):
            self.n += 1  # runs once per trace, never in compiled code
            return fn(*args, **kwargs)

        return counted


def test_meta_steps_fits_and_evaluations_trace_once(tmp_path):
    sine = sinusoid.maml_domain()
    model, params, lr = sinusoid.make_model(), sinusoid.init_mlp(jax.random.PRNGKey(0)), sinusoid.MAML_INNER_LR
    sample = lambda key: sinusoid.sample_tasks(sine, key, 25)[1]
    _, test = sinusoid.sample_tasks(sine, jax.random.PRNGKey(9), 50)
    base = hm.m_shrinkage(model, inner_optimizer=optax.sgd(lr), inner_steps=5, outer_optimizer=optax.adam(1e-3))
    steps, problems = Counter(), Counter()
    learner = base._replace(step=steps.wrap(base.step), inner_problem=problems.wrap(base.inner_problem))
    state = learner.init(jax.random.PRNGKey(0), params)

    step = jax.jit(learner.step)
    s = state
    for i in range(3):
        s, _ = step(s, sample(jax.random.PRNGKey(i)))
    assert steps.n == 1

    # fit: one trace per chunk length, reused by later fit calls, resumed runs included
    steps.n = 0
    key = jax.random.PRNGKey(1)
    s, _ = hm.fit(learner, state, sample, 20, data_key=key, chunk_size=5, progress=False)
    s, _ = hm.fit(learner, s, sample, 10, data_key=key, chunk_size=5, progress=False)
    ck = tmp_path / "ck.npz"
    hm.fit(learner, state, sample, 10, data_key=key, chunk_size=5, progress=False, checkpoint=ck, checkpoint_every=5)
    hm.fit(learner, state, sample, 20, data_key=key, chunk_size=5, progress=False, checkpoint=ck, resume=True)
    assert steps.n == 1

    problems.n = 0
    for _ in range(3):
        hm.evaluate(learner, s, test, 10)
    hm.evaluate(learner, s._replace(params=jax.tree_util.tree_map(lambda a: a + 1e-3, s.params)), test, 10)
    assert problems.n == 1
    hm.evaluate(learner, s, test, 12)  # a new number of steps is a new program, once
    hm.evaluate(learner, s, test, 12)
    assert problems.n == 2


CACHE_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, optax
    from jax import monitoring
    jax.config.update("jax_enable_x64", True)
    import hiermeta as hm
    from hiermeta.models import linear
    counts = {"hits": 0, "misses": 0}
    def listen(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            counts["hits"] += 1
        elif event == "/jax/compilation_cache/cache_misses":
            counts["misses"] += 1
    monitoring.register_event_listener(listen)
    hm.enable_compilation_cache(sys.argv[1])
    paper = linear.paper_domain()
    learner = hm.m_shrinkage(linear.make_model(8), inner_optimizer=optax.sgd(0.3), inner_steps=7)
    state = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
    sample = lambda key: linear.sample_tasks(paper, key, 13)[1]
    state, _ = hm.fit(learner, state, sample, 6, data_key=jax.random.PRNGKey(1), chunk_size=3, progress=False)
    hm.evaluate(learner, state, linear.sample_tasks(paper, jax.random.PRNGKey(2), 11)[1], 7)
    print("COUNTS", counts["hits"], counts["misses"])
    """
)


def test_a_second_process_compiles_nothing(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(CACHE_SCRIPT)
    cache = tmp_path / "cache"
    counts = []
    for _ in range(2):
        out = subprocess.run([sys.executable, str(script), str(cache)], cwd=ROOT, capture_output=True,
                             text=True, timeout=600, env=dict(os.environ))
        assert out.returncode == 0, out.stdout + out.stderr
        line = next(line for line in out.stdout.splitlines() if line.startswith("COUNTS"))
        counts.append(tuple(int(n) for n in line.split()[1:]))
    (hits1, misses1), (hits2, misses2) = counts
    assert misses1 > 0 and hits1 == 0, counts  # the first run compiles and fills the cache
    assert misses2 == 0 and hits2 == misses1, counts  # the second loads every program from it
