"""Held-out predictives of hiermeta.mixed.heldout against dense formulas and scipy's quadrature."""

from types import SimpleNamespace

import numpy as np
import pytest
from scipy import integrate, stats
from scipy.special import expit

from hiermeta.mixed import heldout as H
from hiermeta.mixed.family import get_family
from hiermeta.mixed.glmm import fit_glmm
from hiermeta.mixed.lmm import fit_lmm
from hiermeta.mixed.terms import MixedDesign, make_term, relative_factors


def simulate(rng, family, spec, n=80, n_new=12, beta=(0.2, 0.4)):
    """Training design and held-out rows (last ``n_new``; some of them at an unseen level of term 0)."""
    N = n + n_new
    X = np.column_stack([np.ones(N), rng.normal(size=N)])
    eta = X @ np.asarray(beta)
    codes_all, Zs = [], []
    for k, (L, q) in enumerate(spec):
        codes = np.concatenate([np.arange(L), rng.integers(0, L, N - L)])
        if k == 0:
            codes[-3:] = L  # an unseen level in the held-out rows
        Z = np.column_stack([np.ones(N)] + [rng.normal(size=N) for _ in range(q - 1)])
        b = 0.8 * rng.normal(size=(L + 1, q))
        eta = eta + np.einsum("nq,nq->n", Z, b[codes])
        codes_all.append(codes)
        Zs.append(Z)
    if family == "gaussian":
        y, w = eta + 0.5 * rng.normal(size=N), np.ones(N)
    elif family == "poisson":
        y, w = rng.poisson(np.exp(eta)).astype(float), np.ones(N)
    else:
        w = np.full(N, 3.0)
        y = rng.binomial(3, expit(eta)) / 3.0
    terms = tuple(make_term(f"g{k}", c[:n], Z[:n], [f"c{j}" for j in range(Z.shape[1])])
                  for k, (c, Z) in enumerate(zip(codes_all, Zs)))
    design = MixedDesign(y[:n], X[:n], ("(Intercept)", "x"), terms, np.zeros(n), w[:n])
    units = codes_all[0][n:]
    names, units = np.unique(units, return_inverse=True)
    new_codes = [np.where(c[n:] >= t.num_levels, c[n:] - t.num_levels, -1) for c, t in zip(codes_all, terms)]
    held = H.HeldOut(X[n:], np.zeros(n_new), [np.where(c[n:] < t.num_levels, c[n:], -1) for c, t in zip(codes_all, terms)],
                     [Z[n:] for Z in Zs], new_codes, y[n:], w[n:], units, tuple(str(v) for v in names), "g0")
    return design, held


def fake_fit(design, family, estimate):
    return SimpleNamespace(design=design, estimate=estimate,
                           model=SimpleNamespace(family=family, family_spec=get_family(family)),
                           method=estimate.method)


def dense_posterior(state, design):
    """The dense ``A`` and ``V = Z Lambda`` (standardised scale, internal order) at the state's mode."""
    lay = state.layout
    Vs = []
    for k in lay.order:
        t = lay.terms[k]
        Zk = np.zeros((design.num_rows, t.num_levels * t.num_columns))
        for j in range(t.num_columns):
            Zk[np.arange(design.num_rows), t.codes * t.num_columns + j] = t.Z[:, j]
        Vs.append(Zk @ np.kron(np.eye(t.num_levels), state.factors[k]))
    V = np.concatenate(Vs, axis=1)
    if state.glmm is None:
        W = design.weights
    else:
        g = state.glmm
        eta = g.offset + g.X @ state.beta_s + V @ state.u
        mu, d = g.family.inverse_link(eta), g.family.mu_eta(eta)
        W = g.w * d**2 / g.family.variance(mu)
    return V.T @ (W[:, None] * V) + np.eye(V.shape[1]), V


@pytest.mark.parametrize("family,spec", [("poisson", [(6, 1), (4, 2)]), ("gaussian", [(5, 2), (3, 1)])])
def test_the_joint_sampler_and_solver_give_the_inverse_of_the_dense_pls_matrix(family, spec):
    rng = np.random.default_rng(0)
    design, _ = simulate(rng, family, spec)
    est = fit_lmm(design, "REML", warn=False) if family == "gaussian" else fit_glmm(design, family, warn=False)
    state = H.posterior_state(fake_fit(design, family, est))
    A, _ = dense_posterior(state, design)
    Ainv = np.linalg.inv(A)
    Q = A.shape[0]
    np.testing.assert_allclose(H.solve_A(state, np.eye(Q)), Ainv, atol=1e-10)
    K = H._gaussian_draws(state, np.eye(Q)).T  # x = K e
    np.testing.assert_allclose(K @ K.T, Ainv, atol=1e-10)


def test_the_exact_gaussian_eb_predictive_is_the_dense_one_and_the_draws_agree():
    rng = np.random.default_rng(1)
    design, held = simulate(rng, "gaussian", [(6, 2), (4, 1)])
    est = fit_lmm(design, "REML", warn=False)
    fit = fake_fit(design, "gaussian", est)
    state = H.posterior_state(fit)
    mean, covs = H.eb_gaussian_exact(fit, held, state)
    exact = H.score_gaussian_exact(held, mean, covs)
    # dense: b | y ~ N(b_hat, s^2 Lambda A^-1 Lambda') on the original scale, new levels from the prior
    A, _ = dense_posterior(state, design)
    s2 = est.sigma**2
    lay = state.layout
    blocks, bhat = [], []
    for k in lay.order:
        t, d = lay.terms[k], state.scaling.column_scales[k]
        blocks.append(np.kron(np.eye(t.num_levels), state.factors[k] / d[:, None]))
        bhat.append(np.asarray(est.b[k]).ravel())
    Lam = np.zeros((A.shape[0], A.shape[0]))
    o = 0
    for B in blocks:
        Lam[o:o + B.shape[0], o:o + B.shape[0]] = B
        o += B.shape[0]
    Cb = s2 * Lam @ np.linalg.inv(A) @ Lam.T
    Sigma = [s2 * T @ T.T for T in relative_factors(design.terms, est.theta)]
    for unit in range(held.num_units):
        rows = np.flatnonzero(held.units == unit)
        Zh = np.zeros((rows.size, A.shape[0]))
        o = 0
        prior = np.diag(np.full(rows.size, s2))
        for k in lay.order:
            t = lay.terms[k]
            for r, i in enumerate(rows):
                c = held.codes[k][i]
                if c >= 0:
                    Zh[r, o + c * t.num_columns: o + (c + 1) * t.num_columns] = held.Z[k][i]
            new = held.new_codes[k][rows]
            for level in np.unique(new[new >= 0]):
                Zl = np.where((new == level)[:, None], held.Z[k][rows], 0.0)
                prior = prior + Zl @ Sigma[k] @ Zl.T
            o += t.num_levels * t.num_columns
        mu = held.X[rows] @ est.beta + Zh @ np.concatenate(bhat)
        V = Zh @ Cb @ Zh.T + prior
        assert exact.log_pred[unit] == pytest.approx(stats.multivariate_normal(mu, V).logpdf(held.y[rows]), abs=1e-8)
    # the Laplace draws (exact for a Gaussian model) agree within Monte Carlo error
    draws = H.score("gaussian", held, H.eb_laplace(fit, held, num_draws=4000, seed=3)[0])
    np.testing.assert_allclose(draws.log_pred, exact.log_pred, atol=0.05)
    np.testing.assert_allclose(draws.pit, exact.pit, atol=0.02)


def test_quadrature_and_importance_predictives_equal_scipys_integrals():
    rng = np.random.default_rng(2)
    design, held = simulate(rng, "binomial", [(10, 1)], n=60, n_new=15)
    est = fit_glmm(design, "binomial", warn=False)
    fit = fake_fit(design, "binomial", est)
    quad = H.score("binomial", held, H.eb_quadrature(fit, held, 25))
    imp_pred = H.eb_importance(fit, held, num_draws=4000, seed=4)
    imp = H.score("binomial", held, imp_pred)
    term = design.terms[0]
    sd = est.theta[0]
    for unit in range(held.num_units):
        rows = np.flatnonzero(held.units == unit)
        level = held.codes[0][rows[0]]
        train = np.flatnonzero(term.codes == level) if level >= 0 else np.zeros(0, int)

        def lik(u, idx, X, y, w):
            mu = expit(X[idx] @ est.beta + sd * u)
            return np.exp(np.sum(stats.binom.logpmf(np.round(w[idx] * y[idx]), w[idx], mu)))

        def joint(u):
            return lik(u, train, design.X, design.response, design.weights) * stats.norm.pdf(u)

        top = integrate.quad(lambda u: lik(u, rows, held.X, held.y, held.w) * joint(u), -12, 12, epsabs=0,
                             epsrel=1e-11, limit=200)[0]
        bottom = integrate.quad(joint, -12, 12, epsabs=0, epsrel=1e-11, limit=200)[0]
        assert quad.log_pred[unit] == pytest.approx(np.log(top / bottom), abs=1e-7)
        assert imp.log_pred[unit] == pytest.approx(np.log(top / bottom), abs=0.03)
        # the predictive CDF of the first held-out row's count
        i = rows[0]
        k = round(held.w[i] * held.y[i])
        cdf = integrate.quad(lambda u: stats.binom.cdf(k, held.w[i], expit(held.X[i] @ est.beta + sd * u)) * joint(u),
                             -12, 12, epsabs=0, epsrel=1e-11, limit=200)[0] / bottom
        assert quad.cdf_at[i] == pytest.approx(cdf, abs=1e-7)
    assert imp_pred.diagnostics["ess"] > 500


def test_importance_log_likelihood_matches_agq_at_the_same_point():
    rng = np.random.default_rng(3)
    design, _ = simulate(rng, "binomial", [(30, 1)], n=90, n_new=3)
    est = fit_glmm(design, "binomial", warn=False)
    fit = fake_fit(design, "binomial", est)
    res = H.importance_log_likelihood(fit, num_draws=4000, seed=1)
    state = H.posterior_state(fit)
    agq = -0.5 * state.glmm.agq_deviance(state.theta_s, state.beta_s, 25)
    assert res["per_level"] and res["laplace"] == pytest.approx(est.loglik, abs=1e-6)
    assert abs(res["importance"] - agq) < 4 * res["importance_se"] + 1e-3


def test_the_plug_in_is_the_fit_at_its_modes_and_unseen_levels_at_zero():
    rng = np.random.default_rng(4)
    design, held = simulate(rng, "poisson", [(6, 1), (4, 1)])
    est = fit_glmm(design, "poisson", warn=False)
    fit = fake_fit(design, "poisson", est)
    pred = H.plug_in(fit, held)
    eta = held.X @ est.beta
    for k in range(2):
        seen = held.codes[k] >= 0
        eta[seen] += held.Z[k][seen, 0] * est.b[k][held.codes[k][seen], 0]
    np.testing.assert_allclose(pred.eta[0], eta, rtol=1e-12)
    s = H.score("poisson", held, pred)
    ll = stats.poisson.logpmf(held.y, np.exp(eta))
    np.testing.assert_allclose(s.log_pred, np.bincount(held.units, weights=ll), rtol=1e-10)
    np.testing.assert_allclose(s.cdf_at, stats.poisson.cdf(held.y, np.exp(eta)), rtol=1e-10)
    assert np.all((s.pit >= s.cdf_below) & (s.pit <= s.cdf_at))


def test_a_predictive_without_a_finite_draw_scores_nan_not_zero():
    rng = np.random.default_rng(5)
    design, held = simulate(rng, "binomial", [(6, 1)])
    bad = H.Predictive("broken", np.full((4, held.num_rows), np.nan), None, None)
    s = H.score("binomial", held, bad)
    assert np.all(np.isnan(s.log_pred)) and np.all(np.isnan(s.pit)) and np.all(np.isnan(s.cdf_at))
    from hiermeta.mixed.comparison import _summary

    summary = _summary(s, (0.5, 0.9))
    assert np.isnan(summary["lpd_per_obs"]) and all(np.isnan(v) for v in summary["coverage"].values())
    assert all(np.isnan(v) for v in summary["interval_coverage"].values()) and summary["units_scored"] == 0
