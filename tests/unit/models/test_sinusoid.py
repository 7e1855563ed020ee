"""The sinusoid domain: the MAML protocol, the MLP, layers as modules, and meta-learning on it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import norm

import hiermeta as hm
from hiermeta.models import sinusoid


@pytest.fixture(scope="module")
def domain():
    return sinusoid.maml_domain()


def test_tasks_follow_the_maml_protocol(domain):
    truth, batch = sinusoid.sample_tasks(domain, jax.random.PRNGKey(0), 2000)
    amp, phase = np.asarray(truth.amplitude), np.asarray(truth.phase)
    assert amp.min() >= 0.1 and amp.max() <= 5.0 and amp.min() < 0.2 and amp.max() > 4.9
    assert phase.min() >= 0.0 and phase.max() <= np.pi
    for split in (batch.train, batch.val):
        x, y = np.asarray(split.inputs), np.asarray(split.obs)
        assert x.shape == y.shape == (2000, 10, 1)
        assert x.min() >= -5.0 and x.max() <= 5.0 and x.min() < -4.9 and x.max() > 4.9
        np.testing.assert_allclose(y, amp[:, None, None] * np.sin(x - phase[:, None, None]), rtol=1e-12)
        np.testing.assert_array_equal(split.noise_sd, 1.0)
    assert not np.allclose(batch.train.inputs, batch.val.inputs)  # fresh query points
    noisy = sinusoid.maml_domain(observation_noise=0.3)
    _, nb = sinusoid.sample_tasks(noisy, jax.random.PRNGKey(0), 2000)
    resid = np.asarray(nb.train.obs) - amp[:, None, None] * np.sin(np.asarray(nb.train.inputs) - phase[:, None, None])
    assert resid.std() == pytest.approx(0.3, rel=0.05)
    with pytest.raises(ValueError, match="amplitude range"):
        sinusoid.maml_domain(amplitude=(0.0, 5.0))
    with pytest.raises(ValueError, match="noise_sd must be > 0"):
        sinusoid.maml_domain(noise_sd=0.0)


def test_mlp_layers_and_modules():
    params = sinusoid.init_mlp(jax.random.PRNGKey(1))
    shapes = {k: (v["w"].shape, v["b"].shape) for k, v in params.items()}
    assert shapes == {"layer_0": ((1, 40), (40,)), "layer_1": ((40, 40), (40,)), "layer_2": ((40, 1), (1,))}
    for layer, fan_in in zip(params.values(), (1, 40, 40)):
        for leaf in layer.values():  # PyTorch's nn.Linear default
            assert np.abs(leaf).max() <= 1 / np.sqrt(fan_in)
            assert leaf.size < 40 or np.abs(leaf).max() > 0.8 / np.sqrt(fan_in)
    x = np.linspace(-5, 5, 7)[:, None]
    h = np.maximum(x @ params["layer_0"]["w"] + params["layer_0"]["b"], 0)
    h = np.maximum(h @ params["layer_1"]["w"] + params["layer_1"]["b"], 0)
    np.testing.assert_allclose(sinusoid.mlp(params, x), h @ params["layer_2"]["w"] + params["layer_2"]["b"], rtol=1e-12)
    model = sinusoid.make_model(params)
    part = model.partition
    assert part.names == ("layer_0", "layer_1", "layer_2") and part.num_params == 1761
    np.testing.assert_array_equal(part.module_sizes, [80, 1640, 41])
    assert sinusoid.make_model(params, per_layer=False).partition.num_modules == 6


def test_likelihood_is_gaussian_with_the_known_noise(domain):
    params = sinusoid.init_mlp(jax.random.PRNGKey(2))
    model = sinusoid.make_model(params)
    _, batch = sinusoid.sample_tasks(domain, jax.random.PRNGKey(3), 3)
    task = jax.tree_util.tree_map(lambda a: a[1], batch.train)
    theta = model.partition.ravel(params)
    mean = sinusoid.mlp(params, task.inputs)
    expected = norm.logpdf(np.asarray(task.obs), np.asarray(mean), 1.0).sum()
    np.testing.assert_allclose(model.log_likelihood(theta, task), expected, rtol=1e-12)
    # the reported loss is half the mean squared error, and MAML_INNER_LR matches MAML's 0.01 on the MSE
    mse = lambda th: jnp.mean((sinusoid.mlp(model.partition.unravel(th), task.inputs) - task.obs) ** 2)
    np.testing.assert_allclose(model.generalisation_loss(theta, task), 0.5 * mse(theta), rtol=1e-12)
    nll_step = theta + sinusoid.MAML_INNER_LR * jax.grad(model.log_likelihood)(theta, task)
    np.testing.assert_allclose(nll_step, theta - 0.01 * jax.grad(mse)(theta), rtol=1e-12)


@pytest.mark.slow  # a meta-learning study (40 s); the sinusoid example runs end to end in the default set
def test_m_shrinkage_meta_learns_the_sinusoids(domain):
    learner = hm.m_shrinkage(sinusoid.make_model(), inner_optimizer=optax.sgd(sinusoid.MAML_INNER_LR),
                             inner_steps=5, outer_optimizer=optax.adam(1e-2))
    state = learner.init(jax.random.PRNGKey(0), sinusoid.init_mlp(jax.random.PRNGKey(0)))
    sample = lambda key: sinusoid.sample_tasks(domain, key, 25)[1]
    _, test = sinusoid.sample_tasks(domain, jax.random.PRNGKey(9), 200)
    before = hm.evaluate(learner, state, test, 5)
    state, history = hm.fit(learner, state, sample, 400, data_key=jax.random.PRNGKey(2), progress=False)
    after = hm.evaluate(learner, state, test, 5)
    assert int(state.num_skipped) == 0
    assert before.mean[5] > 1.5 and after.mean[5] < 0.5 * before.mean[5], (before.mean, after.mean)
    assert after.mean[5] < after.mean[0]  # five adaptation steps help on new tasks


@pytest.mark.slow
def test_headline_benchmark_runs_and_its_implementations_agree(tmp_path):
    """benchmarks/sinusoid_maml.py --quick: every implementation's meta-gradient matches (else it exits 1)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "sinusoid_maml.py"), "--quick", "--repeats", "1",
                          "--min-block", "0.05", "--inner-steps", "2", "--out", str(tmp_path)],
                         cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "meta-gradient max relative error" in out.stdout and (tmp_path / "sinusoid_maml.json").exists()
