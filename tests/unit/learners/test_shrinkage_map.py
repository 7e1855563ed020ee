"""hiermeta/learners/shrinkage_map.py: Shrinkage MAP (one sigma) and M-Shrinkage MAP (one per module)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hiermeta as hm


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
