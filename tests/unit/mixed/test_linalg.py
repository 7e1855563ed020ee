"""The blocked PLS factorisation against the dense system solved by NumPy, term structure by term structure."""

import numpy as np
import pytest

from hiermeta.mixed.linalg import CrossProducts, Layout, factorize
from hiermeta.mixed.terms import make_term, relative_factors, theta_lower_bounds, theta_sizes


def _terms(rng, n, spec):
    """Terms from (num_levels, num_columns, correlated) triples, random codes and columns."""
    terms = []
    for k, (L, q, corr) in enumerate(spec):
        codes = np.concatenate([np.arange(L), rng.integers(0, L, n - L)])  # every level used
        rng.shuffle(codes)
        Z = np.column_stack([np.ones(n)] + [rng.normal(size=n) for _ in range(q - 1)])
        terms.append(make_term(f"g{k}", codes, Z, [f"c{j}" for j in range(q)], correlated=corr))
    return terms


def _random_theta(rng, terms):
    theta = rng.uniform(0.3, 1.5, sum(theta_sizes(terms)))
    lower = theta_lower_bounds(terms)
    theta[np.isinf(lower)] = rng.normal(scale=0.4, size=int(np.isinf(lower).sum()))
    return theta


def _dense_reference(layout, X, y, w, theta):
    """The full PLS system in the layout's internal order, solved densely."""
    n = layout.num_rows
    factors = relative_factors(layout.terms, theta)
    blocks, lams = [], []
    for k in layout.order:
        t = layout.terms[k]
        Zk = np.zeros((n, t.num_levels * t.num_columns))
        for j in range(t.num_columns):
            Zk[np.arange(n), t.codes * t.num_columns + j] = t.Z[:, j]
        blocks.append(Zk)
        lams.append(np.kron(np.eye(t.num_levels), factors[k]))
    Z = np.concatenate(blocks, axis=1)
    Q = Z.shape[1]
    Lam = np.zeros((Q, Q))
    o = 0
    for lam in lams:
        Lam[o:o + lam.shape[0], o:o + lam.shape[0]] = lam
        o += lam.shape[0]
    V = Z @ Lam
    W = np.diag(w)
    A = V.T @ W @ V + np.eye(Q)
    p = X.shape[1]
    M = np.block([[A, V.T @ W @ X], [X.T @ W @ V, X.T @ W @ X]])
    rhs = np.concatenate([V.T @ W @ y, X.T @ W @ y])
    sol = np.linalg.solve(M, rhs)
    u, beta = sol[:Q], sol[Q:]
    r = y - X @ beta - V @ u
    pwrss = r @ W @ r + u @ u
    log_det_A = np.linalg.slogdet(A)[1]
    log_det_M = np.linalg.slogdet(M)[1]
    Ainv = np.linalg.inv(A)
    return dict(log_det_A=log_det_A, log_det_X=log_det_M - log_det_A, beta=beta, u=u, pwrss=pwrss,
                cond=Lam @ Ainv @ Lam.T, fixed_cov=np.linalg.inv(M)[Q:, Q:], p=p)


STRUCTURES = {
    "one scalar term": [(12, 1, True)],
    "one correlated slope term": [(9, 2, True)],
    "crossed scalar terms": [(15, 1, True), (6, 1, True)],
    "three terms, correlated and diagonal": [(14, 2, True), (5, 3, False), (4, 1, True)],
    "rest larger in q than the lead in levels": [(10, 1, True), (3, 3, True)],
    "correlated lead beside a scalar crossed term": [(14, 2, True), (6, 1, True)],
}


@pytest.mark.parametrize("name", list(STRUCTURES))
@pytest.mark.parametrize("dense_limit", [4000, 0], ids=["dense-S", "sparse-S"])
@pytest.mark.parametrize("dense_cross", [True, False], ids=["dense-cross", "sparse-cross"])
def test_factorization_matches_the_dense_system(name, dense_limit, dense_cross):
    rng = np.random.default_rng(len(name))
    n = 120
    terms = _terms(rng, n, STRUCTURES[name])
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.uniform(size=n)])
    y = rng.normal(size=n) * 3 + 1
    w = rng.uniform(0.5, 2.0, n)
    layout = Layout(terms, n, dense_cross=dense_cross)
    theta = _random_theta(rng, terms)
    fac = factorize(layout, CrossProducts.build(layout, X, y, w), theta, dense_limit=dense_limit)
    ref = _dense_reference(layout, X, y, w, theta)
    np.testing.assert_allclose(fac.log_det_A, ref["log_det_A"], rtol=1e-10)
    np.testing.assert_allclose(fac.log_det_X, ref["log_det_X"], rtol=1e-9)
    np.testing.assert_allclose(fac.beta, ref["beta"], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(fac.u, ref["u"], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fac.pwrss, ref["pwrss"], rtol=1e-9)
    np.testing.assert_allclose(np.linalg.inv(fac.fixed_precision), ref["fixed_cov"], rtol=1e-8)
    # conditional covariance blocks of b = Lambda u, per term and level
    factors = relative_factors(terms, theta)
    blocks = fac.conditional_covariances(layout, factors)
    o = 0
    for k in layout.order:
        t = terms[k]
        q = t.num_columns
        for level in range(t.num_levels):
            sl = slice(o + level * q, o + (level + 1) * q)
            np.testing.assert_allclose(blocks[k][level], ref["cond"][sl, sl], rtol=1e-8, atol=1e-12)
        o += t.num_levels * q


def test_factorization_without_fixed_effects_and_the_per_term_maps():
    rng = np.random.default_rng(3)
    n = 60
    terms = _terms(rng, n, [(5, 1, True), (7, 2, True)])
    layout = Layout(terms, n)
    assert layout.lead == 1 and layout.rest == (0,)  # 7 x 2 coefficients lead 5 x 1
    y = rng.normal(size=n)
    theta = _random_theta(rng, terms)
    fac = factorize(layout, CrossProducts.build(layout, np.zeros((n, 0)), y), theta)
    ref = _dense_reference(layout, np.zeros((n, 0)), y, np.ones(n), theta)
    np.testing.assert_allclose(fac.u, ref["u"], rtol=1e-9, atol=1e-12)
    assert fac.beta.shape == (0,) and fac.log_det_X == 0.0
    # b = Lambda u per term, and the random part of the linear predictor row by row
    b = layout.per_term(layout.lambda_times(relative_factors(terms, theta), fac.u))
    assert [x.shape for x in b] == [(5, 1), (7, 2)]
    eta = layout.random_predictor(b)
    by_hand = sum(np.sum(t.Z * bk[t.codes], axis=1) for t, bk in zip(terms, b))
    np.testing.assert_allclose(eta, by_hand)
    # the PLS solution minimises ||y - eta||^2 + ||u||^2: its gradient in u vanishes
    np.testing.assert_allclose(fac.pwrss, np.sum((y - eta) ** 2) + fac.u @ fac.u, rtol=1e-10)


@pytest.mark.parametrize("dense_cross", [True, False], ids=["compact", "sparse"])
def test_nested_factors_whose_leading_levels_meet_one_outer_level_each(dense_cross):
    """Nested (Pastes-like: each inner level inside one outer level): one non-zero of the coupling per
    leading level, so no pairs of non-zeros in a level (the compact path's sums over pairs are empty)."""
    rng = np.random.default_rng(7)
    n = 90
    inner = np.repeat(np.arange(15), 6)
    outer = inner // 3  # 5 outer levels, 3 inner levels in each
    terms = [make_term("outer", outer, np.ones(n), ["(Intercept)"]),
             make_term("outer:inner", inner, rng.uniform(0.5, 1.5, n), ["x"])]
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    y, w = rng.normal(size=n), rng.uniform(0.5, 2.0, n)
    layout = Layout(terms, n, dense_cross=dense_cross)
    assert layout.lead == 1 and layout.dense_cross == dense_cross
    if dense_cross:
        assert layout.pair_first.size == 0
    theta = _random_theta(rng, terms)
    fac = factorize(layout, CrossProducts.build(layout, X, y, w), theta)
    ref = _dense_reference(layout, X, y, w, theta)
    np.testing.assert_allclose(fac.log_det_A, ref["log_det_A"], rtol=1e-10)
    np.testing.assert_allclose(fac.u, ref["u"], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fac.pwrss, ref["pwrss"], rtol=1e-9)
