"""hiermeta/learners/shrinkage_map.py: Shrinkage MAP (one sigma) and M-Shrinkage MAP (one per module)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hiermeta as hm
from hiermeta.models import linear


def test_shrinkage_map_has_one_sigma_and_m_shrinkage_map_one_per_module(paper, paper_model, paper_tasks):
    """The shared sigma's gradient is the sum of the per-module gradients at the same sigma (chain rule:
    every module's rho_m equals the one rho), and both equal the closed form of Eq. 2's rho-derivative,
    sum over coordinates of 1/2 - (theta_hat - phi)^2 / (2 sigma^2), averaged over tasks."""
    M = paper_model.partition.num_modules
    assert M > 1
    kwargs = dict(inner_optimizer=optax.sgd(0.3), inner_steps=50)
    one, per_module = hm.shrinkage_map(paper_model, **kwargs), hm.m_shrinkage_map(paper_model, **kwargs)
    assert (one.name, per_module.name) == ("Shrinkage MAP", "M-Shrinkage MAP")
    key = jax.random.PRNGKey(0)
    phi = jnp.linspace(-1.0, 1.0, paper.num_params)
    s1, sM = one.init(key, phi), per_module.init(key, phi)
    assert s1.params["log_sigma2"].shape == (1,) and sM.params["log_sigma2"].shape == (M,)
    assert hm.sigma_of(s1.params, M).shape == (M,)  # one value, broadcast to every module

    batch = paper_tasks[1]
    g1, inner = one.meta_gradient(s1.params, batch)
    gM, _ = per_module.meta_gradient(sM.params, batch)
    np.testing.assert_allclose(g1["log_sigma2"][0], np.sum(gM["log_sigma2"]), rtol=1e-10)
    np.testing.assert_allclose(g1["phi"], gM["phi"], rtol=1e-10)
    sigma2 = float(np.exp(s1.params["log_sigma2"][0]))
    dev = np.asarray(inner.theta) - np.asarray(phi)
    expected = np.mean(np.sum(0.5 - dev**2 / (2 * sigma2), axis=1))
    np.testing.assert_allclose(g1["log_sigma2"][0], expected, rtol=1e-8)


def test_shrinkage_map_steps_along_the_joint_map_gradient(one_step, paper, paper_model, paper_tasks):
    """Converged inner MAP (closed form): phi moves by mean (theta_hat - phi) / sigma^2 and
    rho = log sigma^2 by mean (theta_hat - phi)^2 / (2 sigma^2) - 1/2 (outer SGD at lr 1)."""
    _, batch = paper_tasks
    phi = paper.phi + np.linspace(-0.5, 0.5, 8)
    sigma = np.array([3.0, 1.0, 2.0, 5.0, 0.8, 1.5, 2.5, 4.0])
    learner = hm.m_shrinkage_map(paper_model, inner_optimizer=optax.sgd(0.3), inner_steps=2000,
                                 outer_optimizer=optax.sgd(1.0))
    assert learner.name == "M-Shrinkage MAP"
    state = learner.init(jax.random.PRNGKey(0), jnp.asarray(phi), sigma=sigma)
    minus_grad = jax.tree_util.tree_map(lambda a: -a, one_step(learner, state, batch))
    theta_hat, _ = linear.posterior(batch.train, phi, sigma)
    d = np.asarray(theta_hat) - phi
    np.testing.assert_allclose(minus_grad["phi"], np.mean(d / sigma**2, axis=0), rtol=1e-8)
    np.testing.assert_allclose(minus_grad["log_sigma2"], np.mean(d**2 / (2 * sigma**2) - 0.5, axis=0), rtol=1e-7)


def test_m_shrinkage_map_biases_sigma_low(paper, paper_model):
    """The joint MAP pulls sigma below the truth (8, 8, 8, 8, 2, 2, 2, 2), toward 0 for the second group."""
    learner = hm.m_shrinkage_map(paper_model, inner_optimizer=optax.sgd(0.3), inner_steps=200,
                                 outer_optimizer=optax.adam(0.05), init_sigma=4.0)
    state = learner.init(jax.random.PRNGKey(0), jnp.asarray(paper.phi))
    sample = lambda key: linear.sample_tasks(paper, key, 25)[1]
    state, history = hm.fit(learner, state, sample, 150, data_key=jax.random.PRNGKey(1), progress=False,
                            chunk_size=150)
    sigma = np.asarray(history["sigma"][-1])
    assert int(state.num_skipped) == 0
    assert np.all(sigma[4:] < 1.0) and np.all(sigma[:4] < 8.0), sigma
