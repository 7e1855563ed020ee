"""hiermeta/learners/reptile.py: Reptile is the shrinkage phi step as sigma goes to infinity."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hiermeta as hm


@pytest.mark.parametrize("sigma, close", [(1e6, True), (3.0, False)])
def test_reptile_is_the_shrinkage_phi_step_as_sigma_goes_to_infinity(one_step, sigma, close, paper_model, paper_tasks):
    """Shrinkage's phi step is -mean_t (theta_hat - phi) / sigma^2; scaled by sigma^2 and with sigma
    -> inf (the prior term vanishes from the inner loop) it is Reptile's."""
    _, batch = paper_tasks
    beta, inner = 0.7, optax.sgd(0.2)
    phi = jnp.linspace(-1.0, 2.0, 8)
    rep = hm.reptile(paper_model, inner_optimizer=inner, inner_steps=10, outer_optimizer=optax.sgd(beta))
    outer = optax.multi_transform({"phi": optax.sgd(beta * sigma**2), "rho": optax.set_to_zero()},
                                  {"phi": "phi", "log_sigma2": "rho"})
    shr = hm.shrinkage(paper_model, inner_optimizer=inner, inner_steps=10, outer_optimizer=outer, init_sigma=sigma)
    reptile_move = -one_step(rep, rep.init(jax.random.PRNGKey(0), phi), batch)["phi"]
    shrinkage_move = -one_step(shr, shr.init(jax.random.PRNGKey(0), phi), batch)["phi"]
    # Reptile's move is beta * mean_t (theta_t - phi) with theta_t the K-step SGD iterate (no prior)
    theta = jax.vmap(lambda d: hm.inner.run_inner(rep.inner_problem({"phi": phi}), d, 10).theta)(batch.train)
    np.testing.assert_allclose(reptile_move, beta * np.mean(theta - phi, axis=0), rtol=1e-12)
    if close:
        np.testing.assert_allclose(shrinkage_move, reptile_move, rtol=1e-9)
    else:
        assert np.max(np.abs(shrinkage_move - reptile_move)) > 1e-2
