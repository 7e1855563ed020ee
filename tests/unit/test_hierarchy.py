"""hiermeta/hierarchy.py: the one NumPyro model (Eq. 1) serves log_density, handlers and prior
sampling consistently; its prior covariance, densities and checks against written-out values."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.handlers import condition, seed, trace
from numpyro.infer.util import log_density
from scipy import stats

import hiermeta as hm


def test_joint_log_density_is_the_sum_of_per_task_terms(paper, paper_model, paper_tasks):
    theta, batch = paper_tasks
    phi, sigma = jnp.asarray(paper.phi) + 0.1, jnp.asarray(paper.sigma) * 1.3
    joint, _ = log_density(paper_model, (batch.train,), {}, {"phi": phi, "sigma": sigma, "theta": theta})
    per_task = jax.vmap(lambda th, d: paper_model.inner_objective(th, phi, sigma, d))(theta, batch.train)
    assert float(joint) == pytest.approx(-float(jnp.sum(per_task)), rel=1e-12)  # flat hyperpriors add 0


def test_prior_predictive_from_the_model(paper, paper_model, paper_tasks):
    _, batch = paper_tasks
    template = batch.train._replace(obs=None)
    model = condition(paper_model, {"phi": jnp.asarray(paper.phi), "sigma": jnp.asarray(paper.sigma)})
    tr = trace(seed(model, jax.random.PRNGKey(0))).get_trace(template)
    theta, obs = tr["theta"]["value"], tr["obs"]["value"]
    assert theta.shape == (25, 8) and obs.shape == (25, 4, 9)
    assert not tr["obs"]["is_observed"]
    # the sampled observations scatter around A theta with the known noise
    z = (np.asarray(obs) - np.asarray(theta @ paper.design.T)[:, None, :]) / paper.noise_sd
    assert abs(z.mean()) < 0.2 and abs(z.std() - 1) < 0.1



# ---------------------------------------------------------------------------- a small model with every kind of site
# 3 named coordinates (a, b, c); a and b correlated; one task covariate; known noise sd 0.7.

P, T, N, NOISE = 3, 4, 5, 0.7


def small_model(**kwargs):
    options = dict(correlated=[["a", "b"]], num_task_covariates=1)
    options.update(kwargs)
    return hm.HierarchicalModel(hm.linear_gaussian(), hm.ModulePartition.named(["a", "b", "c"]), **options)


def small_data(seed=0, with_covariates=True):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(T, N, 1, P))
    y = rng.normal(size=(T, N, 1))
    z = rng.normal(size=(T, 1)) if with_covariates else None
    return hm.GaussianData.create(y, NOISE, inputs=hm.LinearDesign(Z), task_covariates=z), Z, y, z


SIGMA = jnp.array([0.5, 2.0, 1.5])
RHO = 0.6
CHOL = jnp.array([[1.0, 0.0], [RHO, np.sqrt(1 - RHO**2)]])  # correlation [[1, rho], [rho, 1]]
GAMMA = jnp.array([[0.3, -0.2, 0.1]])


def dense_cov():
    """Sigma written out: sd_i sd_j rho on the (a, b) block, sd^2 on the diagonal, 0 elsewhere."""
    s = np.asarray(SIGMA)
    cov = np.diag(s**2)
    cov[0, 1] = cov[1, 0] = RHO * s[0] * s[1]
    return cov


def test_prior_covariance_its_factor_and_operator_equal_the_written_out_matrix():
    model = small_model()
    extra = {"corr_chol_0": CHOL, "gamma": GAMMA}
    L = np.asarray(model.prior_scale_tril(SIGMA, extra))
    assert np.allclose(L, np.tril(L))
    np.testing.assert_allclose(L @ L.T, dense_cov(), rtol=1e-12)
    np.testing.assert_allclose(model.prior_cov(SIGMA, extra), dense_cov(), rtol=1e-12)
    u = np.array([0.3, -1.2, 2.0])
    np.testing.assert_allclose(model.prior_cov_operator(SIGMA, extra)(jnp.asarray(u)), dense_cov() @ u, rtol=1e-12)
    # without correlations the operator is the diagonal itself
    plain = small_model(correlated=(), num_task_covariates=0)
    np.testing.assert_allclose(plain.prior_cov_operator(SIGMA), np.asarray(SIGMA) ** 2, rtol=1e-12)


def test_inner_objective_is_minus_the_gaussian_prior_and_likelihood_from_scipy():
    model = small_model()
    data, Z, y, z = small_data()
    extra = {"corr_chol_0": CHOL, "gamma": GAMMA}
    phi, theta = jnp.array([1.0, -0.5, 0.2]), jnp.array([0.7, 0.1, -0.4])
    t = 2
    data_t = jax.tree_util.tree_map(lambda a: a[t], data)
    mean = np.asarray(phi) + z[t] @ np.asarray(GAMMA)
    np.testing.assert_allclose(model.prior_mean(phi, extra, z), np.asarray(phi) + z @ np.asarray(GAMMA), rtol=1e-12)
    log_prior = stats.multivariate_normal(mean, dense_cov()).logpdf(np.asarray(theta))
    log_lik = stats.norm(Z[t, :, 0] @ np.asarray(theta), NOISE).logpdf(y[t, :, 0]).sum()
    got_prior, got_lik = model.task_log_densities(theta, phi, SIGMA, data_t, extra)
    assert float(got_prior) == pytest.approx(log_prior, rel=1e-10)
    assert float(got_lik) == pytest.approx(log_lik, rel=1e-10)
    assert float(model.log_likelihood(theta, data_t, extra)) == pytest.approx(log_lik, rel=1e-10)
    assert float(model.inner_objective(theta, phi, SIGMA, data_t, extra)) == pytest.approx(-(log_prior + log_lik),
                                                                                            rel=1e-10)
    # the test loss: the per-observation NLL without its constant, 1/2 mean squared standardised residual
    resid = (y[t, :, 0] - Z[t, :, 0] @ np.asarray(theta)) / NOISE
    assert float(model.generalisation_loss(theta, data_t, extra)) == pytest.approx(0.5 * np.mean(resid**2), rel=1e-10)


def test_hyper_sites_come_in_model_order_with_their_constraints_and_starts():
    model = hm.HierarchicalModel(hm.linear_gaussian(noise="learned"), hm.ModulePartition.named(["a", "b", "c"]),
                                 correlated=[["a", "b"]], num_task_covariates=2)
    sites = model.hyper_sites()
    assert list(sites) == ["corr_chol_0", "gamma", "noise_sd"]
    assert [s.kind for s in sites.values()] == ["correlation", "group_coefficients", "global"]
    assert sites["corr_chol_0"].shape == (2, 2) and np.array_equal(sites["corr_chol_0"].init, np.eye(2))
    assert sites["gamma"].shape == (2, 3) and not np.any(sites["gamma"].init)
    assert model.correlation_blocks[0].tolist() == [0, 1]
    assert list(model.global_params) == ["noise_sd"]
    with pytest.raises(ValueError, match=r"values for the global parameters \['noise_sd'\]"):
        model.globals_of({})
    with pytest.raises(ValueError, match=r"needs values for its hyperparameter sites"):
        model.task_log_densities(jnp.zeros(3), jnp.zeros(3), SIGMA, None, {"gamma": jnp.zeros((2, 3))})


def test_the_model_samples_theta_around_its_prior_mean_with_its_covariance():
    model = small_model()
    data, *_ = small_data()
    params = {"phi": jnp.array([1.0, -0.5, 0.2]), "sigma": SIGMA, "corr_chol_0": CHOL, "gamma": GAMMA}
    draws = []
    for k in range(400):
        tr = trace(seed(condition(model, params), jax.random.PRNGKey(k))).get_trace(data._replace(obs=None))
        draws.append(np.asarray(tr["theta"]["value"]) - np.asarray(model.prior_mean(params["phi"], params,
                                                                                    data.task_covariates)))
    dev = np.concatenate(draws)  # 1600 draws of theta - mean
    np.testing.assert_allclose(np.cov(dev.T), dense_cov(), atol=0.25)
    assert np.all(np.abs(dev.mean(0)) < 4 * np.sqrt(np.diag(dense_cov()) / dev.shape[0]))


def test_task_covariates_are_required_and_shape_checked():
    model = small_model(correlated=())
    without, *_ = small_data(with_covariates=False)
    with pytest.raises(ValueError, match="task_covariates attribute"):
        model.task_covariates(without)
    with pytest.raises(ValueError, match="give z"):
        model.prior_mean(jnp.zeros(3), {"gamma": GAMMA})
    assert small_model(correlated=(), num_task_covariates=0).task_covariates(without) is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(correlated=[["a", "z"]]), "names module 'z'"),
    (dict(correlated=[[0, 5]]), "index 5 is out of range"),
    (dict(correlated=[["a", "a"]]), "names a module twice"),
    (dict(correlated=[["a", "b"], ["b", "c"]]), r"appear in two correlated blocks"),
    (dict(correlated=[["c"]]), "needs 2 or more"),
    (dict(correlated="ab"), "must be a sequence of blocks"),
    (dict(correlated=["ab"]), "each correlated block must be a sequence"),
    (dict(num_task_covariates=-1), "num_task_covariates must be an integer >= 0"),
    (dict(num_task_covariates=0, gamma_prior=dist.Normal(jnp.zeros((0, 3)), 1.0)), "num_task_covariates is 0"),
    (dict(phi_prior=dist.Normal(jnp.zeros(2), 1.0)), r"phi_prior must have batch_shape \+ event_shape == \(3,\)"),
    (dict(sigma_prior=dist.HalfNormal(jnp.ones(4))), r"sigma_prior must have"),
    (dict(corr_concentration=0.0), "corr_concentration must be finite and > 0"),
    (dict(global_priors={"noise_sd": dist.HalfNormal(1.0)}), r"global_priors for \['noise_sd'\]"),
])
def test_bad_model_construction_is_refused_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_model(**{"correlated": (), "num_task_covariates": 0, **kwargs})


def test_a_likelihood_without_the_protocol_or_with_its_own_latent_site_is_refused():
    part = hm.ModulePartition.named(["a"])
    with pytest.raises(ValueError, match=r"missing: \['num_observations', 'log_normaliser', 'check'\]"):
        hm.HierarchicalModel(lambda theta, data: None, part)
    with pytest.raises(ValueError, match="partition must be a hiermeta.ModulePartition"):
        hm.HierarchicalModel(hm.linear_gaussian(), "a")

    class WithLatent(type(hm.linear_gaussian())):
        def __call__(self, theta, data, g=None):
            numpyro.sample("hidden", dist.Normal(0.0, 1.0))
            return super().__call__(theta, data, g)

    model = hm.HierarchicalModel(WithLatent(), part)
    data = hm.GaussianData.create(np.zeros((1, 2, 1)), 1.0, inputs=np.ones((1, 2, 1, 1)))
    with pytest.raises(ValueError, match="latent site 'hidden'"), seed(rng_seed=0):
        model.log_likelihood(jnp.zeros(1), jax.tree_util.tree_map(lambda a: a[0], data))
    with pytest.raises(ValueError, match="num_tasks=3 but data holds 1 tasks"):
        trace(seed(model, jax.random.PRNGKey(0))).get_trace(data, num_tasks=3)
