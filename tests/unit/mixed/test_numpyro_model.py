"""The mixed model's NumPyro density against the host engine's log joint, and NUTS on it against an
exact posterior (grid quadrature) and under a rescaled response."""

import jax
import numpy as np
import pytest
from scipy import integrate, stats
from scipy.special import expit

from hiermeta.mixed.glmm import fit_glmm, log_joint
from hiermeta.mixed.numpyro_model import MixedNumPyroModel, Priors, mixed_nuts
from hiermeta.mixed.terms import MixedDesign, make_term


def crossed_design(rng, family, n=50):
    """Two crossed terms (a correlated intercept + slope, a scalar one), covariates on odd scales, an offset."""
    X = np.column_stack([np.ones(n), rng.normal(500.0, 30.0, n), rng.uniform(0, 0.01, n)])
    g1 = np.concatenate([np.arange(6), rng.integers(0, 6, n - 6)])
    g2 = np.concatenate([np.arange(4), rng.integers(0, 4, n - 4)])
    t1 = make_term("a", g1, np.column_stack([np.ones(n), rng.normal(0, 20.0, n)]), ["(Intercept)", "x"])
    t2 = make_term("b", g2, np.ones(n), ["(Intercept)"])
    offset = rng.normal(scale=0.1, size=n)
    if family == "gaussian":
        y, w = rng.normal(1000.0, 50.0, n), rng.uniform(0.5, 2.0, n)
    elif family == "poisson":
        y, w = rng.poisson(3.0, n).astype(float), rng.integers(1, 3, n).astype(float)
    else:
        w = rng.integers(1, 6, n).astype(float)
        y = rng.binomial(w.astype(int), 0.4) / w
    return MixedDesign(y, X, ("(Intercept)", "h", "s"), (t1, t2), offset, w)


@pytest.mark.parametrize("family,link", [("gaussian", None), ("poisson", None), ("binomial", "logit"),
                                         ("binomial", "probit"), ("binomial", "cloglog")])
def test_the_numpyro_log_joint_is_the_host_engines_at_random_points(family, link):
    from hiermeta.mixed.family import get_family

    rng = np.random.default_rng(0)
    d = crossed_design(rng, family)
    fam = get_family(family, link)
    model = MixedNumPyroModel(d, fam)
    scale = 40.0 if family == "gaussian" else 1.0
    for _ in range(3):
        beta = rng.normal(size=3) * np.array([scale, scale / 30.0, scale * 10.0])
        if family != "gaussian":
            beta[0] -= 500.0 * beta[1] + 0.005 * beta[2]  # a linear predictor of order 1
        A = rng.normal(size=(2, 2)) * np.array([scale, scale / 20.0])[:, None]
        covs = [A @ A.T + 1e-3 * np.eye(2), np.array([[rng.uniform(0.1, 1.0) * scale**2]])]
        b = [rng.multivariate_normal(np.zeros(2), covs[0], 6), rng.normal(scale=np.sqrt(covs[1][0, 0]), size=(4, 1))]
        sigma = 30.0 if family == "gaussian" else None
        host = log_joint(d, fam, beta, b, covs, sigma)
        ours = model.log_density(model.sites_from(beta, covs, b, sigma, centred=True), centred=True)
        assert ours - model.log_jacobian() == pytest.approx(host, abs=1e-8 * max(1.0, abs(host)))
        # the non-centred density (z = T^-1 b) adds log|det T_k| per level: the Jacobian of b = T z
        sites = model.sites_from(beta, covs, b, sigma, min_sd=0.0)
        noncentred = model.log_density(sites, centred=False)
        log_det = sum(t.num_levels * np.sum(np.log(np.asarray(sites[f"sd_{k}"])))
                      + t.num_levels * (np.sum(np.log(np.diag(np.asarray(sites[f"corr_{k}"])))) if f"corr_{k}" in sites else 0.0)
                      for k, t in enumerate(d.terms))
        assert noncentred == pytest.approx(ours + log_det, abs=1e-8 * max(1.0, abs(host)))


@pytest.mark.parametrize("family", ["gaussian", "binomial"])
def test_the_full_numpyro_density_is_the_host_log_joint_plus_the_documented_priors(family):
    """Every site once: the likelihood and the effects (the host's), beta_s ~ N(m, 5^2), sd ~ HalfNormal(2.5),
    sigma ~ HalfNormal(2.5) (one residual sd, not one per row), the LKJ(2) correlation."""
    import numpyro.distributions as dist
    from numpyro.infer.util import log_density

    rng = np.random.default_rng(7)
    d = crossed_design(rng, family)
    model = MixedNumPyroModel(d, family)
    beta = np.array([0.1, 0.002, 3.0]) * (40.0 if family == "gaussian" else 1.0)
    beta[0] += 1000.0 if family == "gaussian" else -1.0
    covs = [np.array([[4.0, 0.1], [0.1, 0.01]]) * (100.0 if family == "gaussian" else 0.1), np.array([[0.3]])]
    b = [rng.multivariate_normal(np.zeros(2), covs[0], 6), rng.normal(scale=0.5, size=(4, 1))]
    sigma = 30.0 if family == "gaussian" else None
    sites = model.sites_from(beta, covs, b, sigma, centred=True)
    total = float(log_density(model.centred, (model.data,), {}, sites)[0])
    pri = model.priors
    expected = log_joint(d, family, beta, b, covs, sigma) + model.log_jacobian()
    expected += np.sum(stats.norm.logpdf(np.asarray(sites["beta"]), np.asarray(model.data["beta_loc"]), pri.beta))
    for k in range(2):
        expected += np.sum(stats.halfnorm.logpdf(np.asarray(sites[f"sd_{k}"]), scale=pri.sd))
    expected += float(dist.LKJCholesky(2, pri.lkj).log_prob(sites["corr_0"]))
    if family == "gaussian":
        expected += stats.halfnorm.logpdf(float(sites["sigma"]), scale=pri.sigma)
    assert total == pytest.approx(expected, abs=1e-8 * abs(expected))


def _intercept_model(rng, L=6, n_per=5):
    codes = np.repeat(np.arange(L), n_per)
    u = rng.normal(scale=1.2, size=L)
    y = rng.binomial(1, expit(-0.3 + u[codes])).astype(float)
    term = make_term("g", codes, np.ones(codes.size), ["(Intercept)"])
    return MixedDesign(y, np.ones((codes.size, 1)), ("(Intercept)",), (term,), np.zeros(codes.size), np.ones(codes.size))


def _exact_posterior(d, loc, priors):
    """Posterior means of (beta, sd, b_l) by quadrature: a (beta, sd) grid and a z grid per group."""
    beta_grid = np.linspace(loc - 6, loc + 6, 121)
    sd_grid = np.linspace(1e-4, 8.0, 120)
    z = np.linspace(-9, 9, 201)
    codes, y = d.terms[0].codes, d.response
    L = d.terms[0].num_levels
    successes = np.bincount(codes, weights=y, minlength=L)
    trials = np.bincount(codes, minlength=L).astype(float)
    eta = beta_grid[:, None, None] + sd_grid[None, :, None] * z[None, None, :]  # (B, S, Z)
    log_phi = stats.norm.logpdf(z)
    log_f = successes[:, None, None, None] * eta - trials[:, None, None, None] * np.logaddexp(0, eta) + log_phi
    peak = log_f.max(-1, keepdims=True)
    f = np.exp(log_f - peak)
    marg = integrate.simpson(f, x=z, axis=-1)  # (L, B, S)
    first = integrate.simpson(f * z, x=z, axis=-1)
    log_post = (np.sum(np.log(marg) + peak[..., 0], axis=0) + stats.norm.logpdf(beta_grid, loc, priors.beta)[:, None]
                + stats.halfnorm.logpdf(sd_grid, scale=priors.sd)[None, :])
    post = np.exp(log_post - log_post.max())
    norm = integrate.simpson(integrate.simpson(post, x=sd_grid, axis=1), x=beta_grid)

    def mean(values):
        return integrate.simpson(integrate.simpson(post * values, x=sd_grid, axis=1), x=beta_grid) / norm

    b_mean = np.array([mean(sd_grid[None, :] * first[l] / marg[l]) for l in range(L)])
    return mean(beta_grid[:, None] * np.ones_like(post)), mean(np.ones_like(post) * sd_grid[None, :]), b_mean


def test_nuts_matches_the_exact_posterior_within_its_monte_carlo_error():
    from numpyro.diagnostics import effective_sample_size

    rng = np.random.default_rng(1)
    d = _intercept_model(rng)
    fit = fit_glmm(d, "bernoulli")
    res = mixed_nuts(d, "bernoulli", fit, key=jax.random.PRNGKey(3), num_warmup=500, num_samples=1500,
                     num_chains=4, progress_bar=False, target_accept=0.95)
    assert res.diagnostics["num_divergences"] <= 2 and res.settings["started_from"] == "Laplace"
    loc = float(res.model.data["beta_loc"][0])
    beta_mean, sd_mean, b_mean = _exact_posterior(d, loc, res.priors)
    checks = [(res.beta[..., 0], beta_mean), (res.sd[0][..., 0], sd_mean)]
    checks += [(res.b[0][..., l, 0], b_mean[l]) for l in range(d.terms[0].num_levels)]
    for draws, exact in checks:
        mcse = draws.std() / np.sqrt(float(effective_sample_size(draws[..., None])[0]))
        assert abs(draws.mean() - exact) < 4 * mcse, (draws.mean(), exact, mcse)


def test_a_response_scaled_by_a_million_gives_the_posterior_times_a_million():
    """The standardised data NUTS runs on are the same numbers, and the draws map back times 1e6; two runs
    (one key) agree within their Monte Carlo errors (bit-equal draws are not expected: rounding at 1e-16
    grows along the trajectories)."""
    from numpyro.diagnostics import effective_sample_size

    from hiermeta.mixed.estimate import Estimate

    rng = np.random.default_rng(2)
    n = 80
    codes = np.repeat(np.arange(10), 8)
    x = rng.normal(size=n)
    y = 3.0 + 0.5 * x + rng.normal(scale=0.7, size=10)[codes] + rng.normal(scale=0.5, size=n)
    term = make_term("g", codes, np.ones(n), ["(Intercept)"])
    d = MixedDesign(y, np.column_stack([np.ones(n), x]), ("(Intercept)", "x"), (term,), np.zeros(n), np.ones(n))
    big = d._replace(response=1e6 * y)
    small_model, big_model = MixedNumPyroModel(d, "gaussian"), MixedNumPyroModel(big, "gaussian")
    for name in small_model.data:
        np.testing.assert_allclose(big_model.data[name], small_model.data[name], rtol=1e-12, atol=1e-12)
    draws = np.array([[0.3, -0.2], [1.1, 0.4]])
    np.testing.assert_allclose(big_model.beta(draws), 1e6 * small_model.beta(draws), rtol=1e-12)
    np.testing.assert_allclose(big_model.effects(0, draws), 1e6 * small_model.effects(0, draws), rtol=1e-12)

    def start(scale):  # the data-generating values as the fit to start from
        return Estimate("REML", np.array([1.4]), scale * np.array([3.0, 0.5]), np.eye(2), scale * 0.5,
                        [np.zeros((10, 1))], [np.ones((10, 1, 1))], 0.0, 0.0, 4, True, 0, "")

    a, b = [mixed_nuts(dd, "gaussian", start(s), key=4, num_warmup=300, num_samples=500, num_chains=2,
                       progress_bar=False, target_accept=0.95) for dd, s in ((d, 1.0), (big, 1e6))]
    assert a.diagnostics["max_r_hat"] < 1.02 and b.diagnostics["max_r_hat"] < 1.02
    assert a.sigma.shape == (2, 500) and a.sd[0].shape == (2, 500, 1)  # one residual sd per draw, not per row
    # the data's residual sd (0.5) and the groups' sd (0.7) within 3 posterior sds
    assert abs(a.sigma.mean() - 0.5) < 3 * a.sigma.std() and abs(a.sd[0].mean() - 0.7) < 3 * a.sd[0].std()
    for da, db in [(a.beta[..., 0], b.beta[..., 0]), (a.beta[..., 1], b.beta[..., 1]), (a.sigma, b.sigma),
                   (a.sd[0][..., 0], b.sd[0][..., 0]), (a.b[0][..., 3, 0], b.b[0][..., 3, 0])]:
        db = db / 1e6
        se = np.hypot(*(v.std() / np.sqrt(float(effective_sample_size(v[..., None])[0])) for v in (da, db)))
        assert abs(da.mean() - db.mean()) < 4 * se, (da.mean(), db.mean(), se)
        assert db.std() == pytest.approx(da.std(), rel=0.15)


def test_priors_are_checked_against_the_posterior():
    rng = np.random.default_rng(5)
    d = _intercept_model(rng, L=8, n_per=30)
    with pytest.warns(Warning) as caught:
        mixed_nuts(d, "bernoulli", fit_glmm(d, "bernoulli"), key=1, num_warmup=150, num_samples=150, num_chains=1,
                   progress_bar=False, priors=Priors(sd=0.01))
    assert any("Laplace estimate of the sd of (1 | g)" in str(w.message) and "prior" in str(w.message)
               for w in caught)
    with pytest.raises(ValueError, match="num_chains"):
        mixed_nuts(d, "bernoulli", None, num_chains=0)


def test_the_numpyro_model_turns_on_hiermetas_default_compilation_cache(tmp_path):
    """hiermeta.mixed needs no JAX, so importing it leaves the compilation cache alone; the module that
    brings JAX in (NUTS over a mixed model) turns hiermeta's default cache on, as every JAX module of
    hiermeta does (hiermeta.utils.default_compilation_cache)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    code = ("import json, sys\nimport hiermeta.mixed, hiermeta.cli\nbefore = 'jax' in sys.modules\n"
            "import hiermeta.mixed.numpyro_model, jax\n"
            "print(json.dumps([before, jax.config.jax_compilation_cache_dir]))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "HIERMETA_COMPILATION_CACHE")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, str(tmp_path / "xdg" / "hiermeta" / "jax")]
