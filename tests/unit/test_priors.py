"""hiermeta.priors: data-scaled hyperpriors by hand, and the prior-data conflict check."""

import jax.numpy as jnp
import numpy as np
import pytest

import hiermeta as hm
from hiermeta.errors import PriorWarning
from hiermeta.priors import prior_tail_check


def data_and_model(scale):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5))
    Z = np.stack([np.ones((6, 5)), x], -1)
    y = scale * (2.0 + 0.5 * x + rng.normal(size=(6, 5)))
    lik = hm.linear_gaussian(noise="learned")
    model = hm.HierarchicalModel(lik, hm.ModulePartition.per_coordinate(jnp.zeros(2)))
    return model, lik.make_data(y, None, Z), y, x


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_with_priors_scales_to_the_data(scale):
    """phi_p ~ N(pooled fit, (2.5 sd(y) / s(Z_p))^2), sigma scale sd(y) / s(Z_p), noise ~ Exp(1 / sd(y))."""
    model, data, y, x = data_and_model(scale)
    scaled = hm.with_priors(model, data)
    sd_y, s_z = np.std(y), np.array([1.0, np.std(x)])
    np.testing.assert_allclose(scaled.phi_prior.scale, 2.5 * sd_y / s_z, rtol=1e-12)
    np.testing.assert_allclose(scaled.phi_prior.loc, model.likelihood.initial_values(data, model)["phi"], rtol=1e-12)
    np.testing.assert_allclose(scaled.sigma_prior.scale, sd_y / s_z, rtol=1e-12)
    np.testing.assert_allclose(scaled.global_priors["noise_sd"].rate, 1.0 / sd_y, rtol=1e-12)


def test_prior_tail_check_names_a_median_beyond_the_prior_s_quantiles():
    model, data, *_ = data_and_model(1.0)
    with pytest.warns(PriorWarning, match="noise_sd"):
        narrow = hm.with_priors(model, phi_loc=0.0, phi_scale=0.01, sigma_scale=1.0)
    messages = prior_tail_check(narrow, {"phi": np.full((1, 10, 2), 2.0)}, data)
    assert any("posterior median of phi[0]" in m for m in messages)
    assert any("pooled least-squares" in m for m in messages)
    assert prior_tail_check(hm.with_priors(model, data), {"phi": np.full((1, 10, 2), 2.0)}) == []
