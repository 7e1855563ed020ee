"""Where NUTS starts and its first scale (hiermeta.nuts_start), against the values it is built from."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer.hmc_util import _initialize_mass_matrix

import hiermeta as hm
from hiermeta.nuts_start import chain_starts, inverse_mass_matrix, latent_sites, sampler_start

pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(5), 6)
    x = rng.normal(size=30)
    y = 1e6 * (3 + 0.5 * x + rng.normal(size=5)[g] + 0.2 * rng.normal(size=30))
    return hm.from_table(pd.DataFrame({"y": y, "g": g, "x": x}), response="y", group="g", random=["1", "x"])


def test_latent_sites_follow_the_parametrisation_and_the_fixed_sites(table):
    model = table.model()
    centred = latent_sites(model, table.data, {}, noncentred=False)
    assert sorted(centred) == ["corr_chol_0", "noise_sd", "phi", "sigma", "theta"]
    assert centred["theta"][1] == (5, 2) and centred["corr_chol_0"][1] == (2, 2)
    noncentred = latent_sites(model, table.data, {"sigma": np.ones(2)}, noncentred=True)
    assert sorted(noncentred) == ["corr_chol_0", "noise_sd", "phi", "theta_decentered"]


def test_the_start_is_the_pooled_fit_and_the_unit_the_standardised_scale(table):
    model = hm.with_priors(table.model(), table.data)
    start, unit = sampler_start(model, table.data, {}, noncentred=False)
    own = model.likelihood.initial_values(table.data, model)
    scales = model.likelihood.prior_scales(table.data, model)
    np.testing.assert_allclose(start["phi"], own["phi"], rtol=1e-12)
    np.testing.assert_allclose(start["sigma"], np.log(own["sigma"]), rtol=1e-12)  # positive: log scale
    np.testing.assert_allclose(start["noise_sd"], np.log(own["noise_sd"]), rtol=1e-12)
    np.testing.assert_allclose(start["theta"], np.broadcast_to(own["phi"], (5, 2)), rtol=1e-12)  # the prior mean
    np.testing.assert_allclose(start["corr_chol_0"], np.zeros(1), atol=1e-12)  # identity correlation
    np.testing.assert_allclose(unit["phi"], scales["phi_scale"] / 2.5, rtol=1e-12)
    np.testing.assert_allclose(unit["theta"], np.broadcast_to(scales["phi_scale"] / 2.5, (5, 2)), rtol=1e-12)
    assert unit["phi"][0] > 1e5 and np.all(unit["sigma"] == 1.0) and np.all(unit["noise_sd"] == 1.0)
    # each chain starts within one unit of the start, and the chains start apart
    starts = chain_starts(jax.random.PRNGKey(0), start, unit, 4)
    for name in start:
        offset = (np.asarray(starts[name]) - start[name]) / unit[name]
        assert offset.shape == (4,) + np.shape(start[name]) and np.all(np.abs(offset) <= 1.0)
        assert np.ptp(offset, axis=0).min() > 0


@pytest.mark.parametrize("dense_mass", [False, True, [("phi", "sigma")], [("theta",), ("noise_sd", "phi")]])
def test_the_inverse_mass_matrix_has_numpyros_layout(table, dense_mass):
    model = table.model()
    start, unit = sampler_start(model, table.data, {}, noncentred=False)
    z = {name: jnp.asarray(value) for name, value in start.items()}
    blocks = ([tuple(sorted(z))] if dense_mass else []) if isinstance(dense_mass, bool) else dense_mass
    built, _, _ = _initialize_mass_matrix(z, inverse_mass_matrix(unit, dense_mass), blocks)
    for block, matrix in built.items():
        expected = np.concatenate([np.ravel(unit[name]) ** 2 for name in block])
        diagonal = np.diag(matrix) if np.ndim(matrix) == 2 else np.asarray(matrix)
        np.testing.assert_allclose(diagonal, expected, rtol=1e-12, err_msg=str(block))
    assert sorted(name for block in built for name in block) == sorted(z)
