"""The GLM families: densities and CDFs against scipy.stats, starting values against statsmodels'
GLM, the input checks, and the predictive scores for discrete outcomes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

import hiermeta as hm
from hiermeta import families as fam
from hiermeta.predictive import interval_coverage, score_draws

T, N, K = 3, 5, 2


def intercept_model(lik, P=1):
    return hm.HierarchicalModel(lik, hm.ModulePartition.from_labels(jnp.zeros(P), "effect"))


@pytest.fixture(scope="module")
def design():
    rng = np.random.default_rng(0)
    Z = np.concatenate([np.ones((T, N, 1)), rng.normal(size=(T, N, 1))], axis=-1)  # intercept and slope
    X = rng.normal(size=(T, N, K))
    offset = rng.normal(0.0, 0.3, size=(T, N))
    mask = np.ones((T, N), bool)
    mask[1, 3:] = False
    theta = np.array([[0.3, -0.2], [-0.5, 0.4], [0.1, 0.1]])
    beta = np.array([0.25, -0.15])
    eta = np.einsum("tnp,tp->tn", Z, theta) + X @ beta + offset
    return dict(rng=rng, Z=Z, X=X, offset=offset, mask=mask, theta=theta, beta=beta, eta=eta)


def family_cases(d):
    """(likelihood, data, globals, scipy frozen distribution of every observation)."""
    rng, eta, mask = d["rng"], d["eta"], d["mask"]
    p = 1.0 / (1.0 + np.exp(-eta))
    trials = rng.integers(1, 12, size=(T, N))
    successes = rng.binomial(trials, p)
    exposure = rng.uniform(0.5, 3.0, size=(T, N))
    mu = exposure * np.exp(eta)
    counts = rng.poisson(mu)
    flips = rng.binomial(1, p)
    t_obs = eta + 0.7 * rng.standard_t(4.0, size=(T, N))
    g = {"beta": jnp.asarray(d["beta"])}
    args = (d["Z"], d["X"], d["offset"])
    return {
        "binomial": (fam.binomial(num_fixed=K), fam.binomial(num_fixed=K).make_data(
            successes, mask, *args, trials=trials), g, stats.binom(trials, p), successes),
        "bernoulli": (fam.bernoulli(num_fixed=K), fam.bernoulli(num_fixed=K).make_data(flips, mask, *args), g,
                      stats.bernoulli(p), flips),
        "poisson": (fam.poisson(num_fixed=K), fam.poisson(num_fixed=K).make_data(
            counts, mask, *args, exposure=exposure), g, stats.poisson(mu), counts),
        "student_t": (fam.student_t(num_fixed=K), fam.student_t(num_fixed=K).make_data(t_obs, mask, *args),
                      {**g, "scale": jnp.asarray(0.7), "df": jnp.asarray(4.0)}, stats.t(4.0, eta, 0.7), t_obs),
        "student_t fixed": (fam.student_t(num_fixed=K, scale=0.7, df=4.0),
                            fam.student_t(num_fixed=K, scale=0.7, df=4.0).make_data(t_obs, mask, *args), g,
                            stats.t(4.0, eta, 0.7), t_obs),
        "gaussian": (fam.gaussian(num_fixed=K), fam.gaussian(num_fixed=K).make_data(t_obs, mask, *args),
                     {**g, "noise_sd": jnp.asarray(0.7)}, stats.norm(eta, 0.7), t_obs),
    }


@pytest.mark.parametrize("name", ["binomial", "bernoulli", "poisson", "student_t", "student_t fixed", "gaussian"])
def test_log_likelihood_and_cdf_match_scipy(design, name):
    lik, data, g, frozen, y = family_cases(design)[name]
    model = intercept_model(lik, P=2)
    mask = design["mask"]
    want = np.where(mask, frozen.logpdf(y) if name.startswith(("student", "gaussian")) else frozen.logpmf(y), 0.0)
    for t in range(T):
        one = jax.tree_util.tree_map(lambda a: a[t], data)
        got = model.log_likelihood(jnp.asarray(design["theta"][t]), one, g)
        assert float(got) == pytest.approx(want[t].sum(), rel=1e-10, abs=1e-10)
    if name == "gaussian":
        return
    theta = jnp.asarray(design["theta"])
    for shift in (-1.0, 0.0, 0.5, 2.0):  # below, at and above the observations
        got = np.asarray(lik.cdf(theta, data, jnp.asarray(y + shift), g))
        np.testing.assert_allclose(got[mask], frozen.cdf(y + shift)[mask], rtol=1e-8, atol=1e-12)
    # the constant part: log p minus it depends on theta only through eta
    const = np.asarray(lik.log_normaliser(data))
    if name == "binomial":
        np.testing.assert_allclose(const, np.where(mask, stats.binom.logpmf(y, data.trials, 0.5)
                                                   - data.trials * np.log(0.5), 0).sum(1), rtol=1e-10)
    if name == "poisson":
        np.testing.assert_allclose(const, np.where(mask, stats.poisson.logpmf(y, 1.0) + 1.0, 0).sum(1), rtol=1e-10)


def test_pooled_start_matches_statsmodels_glm(design):
    sm = pytest.importorskip("statsmodels.api")
    rng, mask = design["rng"], np.ones((T, N), bool)
    Z = np.ones((T, N, 1))
    X, offset, eta = design["X"], design["offset"], design["eta"]
    trials = rng.integers(1, 12, size=(T, N))
    y = rng.binomial(trials, 1.0 / (1.0 + np.exp(-eta)))
    lik = fam.binomial(num_fixed=K)
    start = lik.initial_values(lik.make_data(y, mask, Z, X, offset, trials=trials), intercept_model(lik))
    A = np.column_stack([np.ones(T * N), X.reshape(-1, K)])
    ref = sm.GLM(np.column_stack([y.ravel(), (trials - y).ravel()]), A, family=sm.families.Binomial(),
                 offset=offset.ravel()).fit()
    np.testing.assert_allclose(np.concatenate([start["phi"], start["beta"]]), ref.params, rtol=1e-6)
    exposure = rng.uniform(0.5, 3.0, size=(T, N))
    counts = rng.poisson(exposure * np.exp(eta))
    lik = fam.poisson(num_fixed=K)
    start = lik.initial_values(lik.make_data(counts, mask, Z, X, exposure=exposure), intercept_model(lik))
    ref = sm.GLM(counts.ravel(), A, family=sm.families.Poisson(), exposure=exposure.ravel()).fit()
    np.testing.assert_allclose(np.concatenate([start["phi"], start["beta"]]), ref.params, rtol=1e-6)
    assert start["sigma"] == pytest.approx([1.0])  # one unit on the log scale


def test_bad_input_raises_naming_the_problem():
    Z = np.ones((2, 3, 1))
    binomial, poisson = fam.binomial(), fam.poisson()
    with pytest.raises(ValueError, match="successes exceed trials"):
        binomial.make_data([[1, 5, 0], [2, 2, 2]], None, Z, trials=[[3, 4, 3], [3, 3, 3]])
    with pytest.raises(ValueError, match="non-negative integer counts"):
        binomial.make_data([[1, -1, 0], [2, 2, 2]], None, Z, trials=3)
    with pytest.raises(ValueError, match="trials must be positive integers"):
        binomial.make_data([[0, 1, 0], [1, 1, 1]], None, Z, trials=[[2.5, 3, 3], [3, 3, 3]])
    with pytest.raises(ValueError, match="trials"):
        binomial.make_data([[0, 1, 0], [1, 1, 1]], None, Z)
    with pytest.raises(ValueError, match=r"response \(counts\) must be non-negative integer counts"):
        poisson.make_data([[0, 1.5, 2], [1, 1, 1]], None, Z)
    with pytest.raises(ValueError, match="non-negative integer counts"):
        poisson.make_data([[0, -2, 2], [1, 1, 1]], None, Z)
    with pytest.raises(ValueError, match="exposure must be finite and > 0"):
        poisson.make_data([[0, 1, 2], [1, 1, 1]], None, Z, exposure=[[1.0, -2.0, 1.0], [1, 1, 1]])
    with pytest.raises(ValueError, match="exposure must be finite and > 0"):
        poisson.make_data([[0, 1, 2], [1, 1, 1]], None, Z, exposure=0.0)
    with pytest.raises(ValueError, match="0 or 1"):
        fam.bernoulli().make_data([[0, 1, 2], [1, 1, 1]], None, Z)
    with pytest.raises(ValueError, match=r"task\(s\) \[1\] hold no observations"):
        poisson.make_data([[0, 1, 2], [1, 1, 1]], [[1, 1, 1], [0, 0, 0]], Z)
    with pytest.raises(ValueError, match="NaN or infinite"):
        poisson.make_data([[0, 1, 2], [1, 1, 1]], None, np.full((2, 3, 1), np.nan))
    with pytest.raises(ValueError, match="must have shape"):
        poisson.make_data([[0, 1, 2], [1, 1, 1]], None, np.ones((2, 4, 1)))
    with pytest.raises(ValueError, match="num_fixed=0"):
        poisson.make_data([[0, 1, 2], [1, 1, 1]], None, Z, np.ones((2, 3, 1)))
    with pytest.raises(ValueError, match="fixed-effects design"):
        fam.poisson(num_fixed=2).make_data([[0, 1, 2], [1, 1, 1]], None, Z)
    with pytest.raises(ValueError, match="df must be finite and > 0"):
        fam.student_t(df=-1.0)
    # padding may hold anything: NaN or impossible counts where the mask is False
    data = binomial.make_data([[1, np.nan, 0], [2, 9, 2]], [[1, 0, 1], [1, 0, 1]], Z, trials=3)
    assert np.all(np.isfinite(np.asarray(data.response))) and int(data.mask.sum()) == 4


def test_randomised_pit_interval_coverage_and_brier(design):
    """Scores against a direct numpy computation, and calibration at the true parameters."""
    rng, Z = np.random.default_rng(3), np.ones((T, N, 1))
    lik = fam.bernoulli()
    flips = rng.binomial(1, 0.4, size=(T, N))
    data = lik.make_data(flips, design["mask"], Z)
    model = intercept_model(lik)
    draws = rng.normal(-0.4, 0.5, size=(T, 7, 1))
    log_w = rng.normal(size=(T, 7))
    scores = score_draws(model, draws, data, log_w, key=jax.random.PRNGKey(1))
    w = np.exp(log_w - logsumexp(log_w, axis=1, keepdims=True))
    p1 = np.einsum("ts,ts->t", w, 1.0 / (1.0 + np.exp(-draws[..., 0])))[:, None]  # P(y = 1) per task
    mask = design["mask"]
    np.testing.assert_allclose(scores.brier[mask], ((p1 - flips) ** 2 * np.ones((T, N)))[mask], rtol=1e-12)
    np.testing.assert_allclose(scores.cdf_at[mask], np.where(flips == 1, 1.0, 1.0 - p1)[mask], rtol=1e-12)
    np.testing.assert_allclose(scores.cdf_below[mask], np.where(flips == 1, 1.0 - p1, 0.0)[mask], atol=1e-15)
    assert np.all((scores.pit[mask] >= scores.cdf_below[mask]) & (scores.pit[mask] <= scores.cdf_at[mask]))
    assert np.all(np.isnan(scores.pit[~mask])) and np.all(np.isnan(scores.brier[~mask]))
    lp = np.where(mask[:, None], stats.bernoulli.logpmf(flips[:, None], 1 / (1 + np.exp(-draws))), 0).sum(-1)
    np.testing.assert_allclose(scores.log_pred, logsumexp(np.log(w) + lp, axis=1), rtol=1e-12)
    summary = scores.summary()
    assert summary["brier"] == pytest.approx(np.mean(scores.brier[mask]))
    # calibration: Poisson counts scored under the parameters that generated them
    M = 4000
    lik = fam.poisson()
    mu_log = rng.normal(0.5, 0.8, size=(M, 1))
    counts = rng.poisson(np.exp(mu_log) * np.ones((M, 2)))
    data = lik.make_data(counts, None, np.ones((M, 2, 1)))
    scores = score_draws(intercept_model(lik), mu_log[:, None, :], data)
    assert stats.kstest(scores.pit.ravel(), "uniform").pvalue > 1e-3
    low, high = interval_coverage(scores.cdf_below, scores.cdf_at, (0.5, 0.9))
    assert 0.5 <= low < 0.75 and 0.9 <= high < 0.97  # discrete central intervals cover at least q
    # an off-by-one CDF (F(y) used as F(y - 1)) is caught by the same check
    shifted = np.asarray(lik.cdf(jnp.asarray(mu_log), data, jnp.asarray(counts - 1.0)))
    assert stats.kstest(shifted.ravel(), "uniform").pvalue < 1e-6


def documented_negative_binomial():
    """The negative binomial family of docs/families.md, verbatim: the protocol as documented works."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "families.md").read_text()
    code = re.search(r"```python\n(import jax.numpy as jnp\n.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/families.md", "exec"), namespace)
    return namespace["NegativeBinomial"]


def test_the_documented_custom_family_works_end_to_end(design):
    NegativeBinomial = documented_negative_binomial()
    rng, mask, eta = np.random.default_rng(7), design["mask"], design["eta"]
    r = 3.0
    mu = np.exp(eta)
    y = rng.negative_binomial(r, r / (r + mu))
    lik = NegativeBinomial(num_fixed=K)
    data = lik.make_data(y, mask, design["Z"], design["X"], design["offset"])
    model = intercept_model(lik, P=2)
    g = {"beta": jnp.asarray(design["beta"]), "concentration": jnp.asarray(r)}
    frozen = stats.nbinom(r, r / (r + mu))
    for t in range(T):
        one = jax.tree_util.tree_map(lambda a: a[t], data)
        got = model.log_likelihood(jnp.asarray(design["theta"][t]), one, g)
        assert float(got) == pytest.approx(np.where(mask[t], frozen.logpmf(y)[t], 0).sum(), rel=1e-10)
    np.testing.assert_allclose(np.asarray(lik.cdf(jnp.asarray(design["theta"]), data, jnp.asarray(y), g))[mask],
                               frozen.cdf(y)[mask], rtol=1e-8)
    with pytest.raises(ValueError, match="non-negative integers"):
        lik.make_data(-y, mask, design["Z"], design["X"])
    assert set(model.hyper_sites()) == {"beta", "concentration"}
