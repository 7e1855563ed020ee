"""Eight schools: NUTS on the hierarchical model against the exact posterior by quadrature;
type-II ML and the predictive-likelihood (data-fission) estimates against the library."""

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from hiermeta import posterior as hp
from hiermeta.implicit import eq4_solve, implicit_vjp
from hiermeta.models import eight_schools as es
from hiermeta.models import linear


def z_threshold(num_comparisons, alpha=0.01):
    return float(stats.norm.ppf(1 - alpha / (2 * num_comparisons)))


def test_exact_posterior_equals_brute_force_grid():
    """The 1-D quadrature (mu and theta integrated analytically) against a dense 2-D grid in (mu, tau)."""
    ex = es.exact_posterior()
    u = (np.arange(4000) + 0.5) / 4000 * (np.pi / 2)  # tau = 5 tan(u): uniform prior in u
    tau = 5 * np.tan(u)[:, None]
    mu = np.linspace(-30, 40, 3001)[None, :]
    log_p = stats.norm(0, 5).logpdf(mu) + sum(
        stats.norm(mu, np.sqrt(tau**2 + s**2)).logpdf(y) for y, s in zip(es.Y, es.SE))
    w = np.exp(log_p - log_p.max())
    w /= w.sum()
    assert np.sum(w * mu) == pytest.approx(ex.mu_mean, abs=2e-3)
    assert np.sqrt(np.sum(w * mu**2) - np.sum(w * mu) ** 2) == pytest.approx(ex.mu_sd, abs=2e-3)
    assert np.sum(w * tau) == pytest.approx(ex.tau_mean, abs=2e-2)  # the grid truncates tau's tail
    assert ex.mu_mean == pytest.approx(4.397, abs=1e-3) and ex.tau_mean == pytest.approx(3.598, abs=1e-3)


@pytest.fixture(scope="module")
def nuts_run():
    model = es.make_model()
    return model, hp.run_nuts(model, es.make_data(), jax.random.PRNGKey(0), num_warmup=1000, num_samples=2500,
                              num_chains=4, noncentred=True, target_accept=0.9, progress_bar=False,
                              task_names=es.SCHOOLS)


def test_nuts_matches_quadrature_within_monte_carlo_error(nuts_run):
    model, result = nuts_run
    ex = es.exact_posterior()
    table = hp.summary(result, ["phi", "sigma", "theta"])
    assert len(table) == 10
    table = table.loc[["phi[0]", f"sigma[{model.partition.names[0]}]"] + [f"theta[0, {s}]" for s in es.SCHOOLS]]
    want_mean = np.concatenate([[ex.mu_mean, ex.tau_mean], ex.theta_mean])
    want_sd = np.concatenate([[ex.mu_sd, ex.tau_sd], ex.theta_sd])
    z_mean = (table["mean"].to_numpy() - want_mean) / table["mcse_mean"].to_numpy()
    z_sd = (table["sd"].to_numpy() - want_sd) / table["mcse_sd"].to_numpy()
    z = z_threshold(2 * want_mean.size)
    assert np.max(np.abs(z_mean)) < z, z_mean
    assert np.max(np.abs(z_sd)) < z, z_sd
    assert table["r_hat"].max() < 1.01
    assert result.num_divergences <= 5  # non-centred: (almost) none
    # dims: module for sigma, task (school names) for theta and the log-likelihood
    idata = result.inference_data
    assert idata.posterior["sigma"].dims == ("chain", "draw", "module")
    assert list(idata.posterior["task"].values) == es.SCHOOLS
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "task")
    # plain az.summary on the object (every posterior variable) labels the same rows with the same numbers
    plain = az.summary(idata, round_to="none")
    assert set(table.index) < set(plain.index) and "theta_decentered[0, A]" in plain.index
    np.testing.assert_allclose(plain.loc[table.index, "mean"].to_numpy(dtype=float), table["mean"].to_numpy(dtype=float),
                               rtol=1e-12)


def test_type2_ml_is_at_the_boundary_and_the_library_agrees():
    t2 = es.type2_ml()
    assert t2["tau"] == 0.0 and t2["boundary"] and t2["slope_at_zero"] < 0
    assert t2["mu"] == pytest.approx(np.sum(es.Y / es.SE**2) / np.sum(es.SE**-2.0))
    # the library's L-BFGS over (phi, log sigma) runs sigma towards 0 and reaches the same value
    fit = linear.fit_type2_ml(es.make_data(), linear.make_model(1), phi0=[5.0], sigma0=[5.0])
    assert fit.sigma[0] < 0.05
    assert fit.log_marginal == pytest.approx(t2["log_marginal"], abs=1e-4)
    assert fit.phi[0] == pytest.approx(t2["mu"], abs=1e-3)


def test_fission_pll_closed_form_matches_library_monte_carlo():
    """E_z PLL and its Eq. 4 / exact rho-gradients, against the library on 20,000 random fissions."""
    model = linear.make_model(1)
    batch = es.fission_batch(jax.random.PRNGKey(0), 20000)
    mu, tau = 6.0, 4.0
    phi, sigma = jnp.array([mu]), jnp.array([tau])
    theta_hat, _ = linear.posterior(batch.train, phi, sigma)
    pll = np.asarray(jax.vmap(model.log_likelihood)(theta_hat, batch.val)).reshape(-1, 8)

    def per_task(theta, train_t, val_t):
        params = {"phi": phi, "log_sigma2": jnp.log(sigma**2)}
        inner_grad = jax.grad(lambda th, p: model.inner_objective(th, p["phi"], jnp.exp(0.5 * p["log_sigma2"]), train_t))
        g = jax.grad(model.log_likelihood)(theta, val_t)
        return implicit_vjp(inner_grad, theta, params, eq4_solve(None, sigma**2, g))["log_sigma2"][0]

    eq4 = np.asarray(jax.vmap(per_task)(theta_hat, batch.train, batch.val)).reshape(-1, 8)
    want_pll = es.fission_pll(mu, tau)
    want_eq4, _ = es.fission_pll_gradients(mu, tau)
    z = z_threshold(16)
    for got, want in ((pll, want_pll), (eq4, want_eq4)):
        se = got.std(0) / np.sqrt(got.shape[0])
        assert np.all(np.abs(got.mean(0) - want) < z * se), (got.mean(0), want, se)
    # the exact gradient is d E[PLL] / d rho, by finite differences of the closed form
    h = 1e-5
    fd = (es.fission_pll(mu, tau * np.exp(h / 2)) - es.fission_pll(mu, tau * np.exp(-h / 2))) / (2 * h)  # rho +- h
    np.testing.assert_allclose(es.fission_pll_gradients(mu, tau)[1], fd, rtol=1e-6)


def test_pll_estimates_on_eight_schools_are_at_the_boundary():
    est = es.pll_estimate()
    assert est["pll_tau"] == 0.0 and est["pll_boundary"]
    assert est["eq4_tau"] == 0.0 and est["eq4_boundary"]
    # but with larger between-school spread the PLL estimate is interior and the Eq. 4 root differs
    spread = es.pll_estimate(y=es.Y * 3)
    assert 0 < spread["pll_tau"] < 100 and 0 < spread["eq4_tau"] < 100
    assert spread["eq4_tau"] != pytest.approx(spread["pll_tau"], rel=1e-3)
