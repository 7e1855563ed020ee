"""Generalised linear mixed models: PIRLS, the Laplace approximation and adaptive Gauss-Hermite quadrature.

The model (:mod:`hiermeta.mixed.terms`): ``eta = X beta + offset + Z Lambda_theta u``,
``u ~ N(0, I)`` (``b = Lambda_theta u``, ``Sigma_k = T_k T_k'``), ``y_i | u ~ family(g^-1(eta_i))``
with prior weights ``w_i`` (:mod:`hiermeta.mixed.family`).  The marginal likelihood
``L(theta, beta) = int prod_i p(y_i | u) phi(u) du`` is approximated as lme4 does (Bates et al.
2015, section 5.4 of the lme4 book draft; ``glmer``'s ``nAGQ``):

**PIRLS** (penalised iteratively re-weighted least squares) finds the conditional mode
``u*(theta, beta) = argmin_u pdev(u)``, ``pdev(u) = -2 sum_i log p(y_i | u) + ||u||^2``: at the
current ``eta``, working weights ``W_i = w_i (d mu / d eta)^2 / V(mu)`` and working response
``z_i = eta_i - fixed_i + (y_i - mu_i) / (d mu / d eta)``; the PLS system of
:mod:`hiermeta.mixed.linalg` with these weights gives the next ``u`` (and ``beta`` when it is
updated jointly, ``nAGQ = 0``); a step that does not lower ``pdev`` is halved (up to 20 times).
It stops when the accepted step is below ``1e-10`` (every coordinate) or ``pdev`` changes by less
than ``1e-13`` relative; for a canonical link this is Newton's method (quadratic convergence).

**Laplace** (``nAGQ = 1``): ``-2 log L ~ pdev(u*) + log|Lambda'Z'WZ Lambda + I|``, ``W`` at
``u*``; with every constant of the family's log-likelihood, so ``-1/2`` of it is lme4's
``logLik``.  (For a non-canonical link ``W`` is the expected, Fisher, information, as in lme4.)

**Adaptive Gauss-Hermite quadrature** (``nAGQ = K > 1``, one scalar random-effect term): the
levels are independent given ``(theta, beta)``; level ``l``'s integral, centred at its mode
``u*_l`` and scaled by ``s_l = A_ll^-1/2`` (``A`` the PLS matrix at the mode), is
``L_l ~ s_l sum_k w_k e^{z_k^2/2} p(y_l | u*_l + s_l z_k) phi(u*_l + s_l z_k)`` with the
probabilists' Gauss-Hermite rule ``(z_k, w_k)`` (``sum w_k = sqrt(2 pi)``); one node is the
Laplace approximation.

**The fit** (lme4's two stages): ``nAGQ = 0`` optimises ``theta`` with ``beta`` inside PIRLS
(the ``pdev + log|A|`` criterion); from there ``nAGQ >= 1`` optimises ``(theta, beta)`` jointly.
Both run on an internally standardised scale: the fixed-effect columns are centred (when there is
an intercept) and scaled to unit sd (``X_s = X M``, ``beta = M beta_s``), each random-effect
column scaled to unit root-mean-square (``Z_s = Z D^-1``, ``T_s = D T``), so a covariate in metres
and one in kilometres give the same path.  L-BFGS-B with central finite differences, then one
Newton step on the finite-difference Hessian (accepted only if it lowers the criterion).

**Fixed-effect covariance**: as lme4 for ``nAGQ > 0``: ``2 H^-1`` restricted to ``beta``, ``H``
the Hessian of ``-2 log L`` over ``(theta, beta)`` (central finite differences on the
standardised scale, mapped back by ``M``); covariance parameters on the boundary are held fixed.
When ``H`` is not positive definite (or for ``nAGQ = 0``) the PLS system's ``(R_X'R_X)^-1`` is
used instead (lme4's fallback), and the result says so.  **Conditional modes** ``b = Lambda u*``
with conditional covariances ``Lambda A^-1 Lambda'`` (lme4's ``ranef(condVar = TRUE)``).

**Checks before fitting**: the response is checked by the family (counts that are not
non-negative integers, successes above the trials); an all-equal binary response (all 0 or all
1; all counts 0) and separation of the fixed effects (a direction ``d`` with ``X d >= 0`` where
the response is at its maximum, ``<= 0`` at its minimum (0) and ``= 0`` elsewhere, found by a
linear programme; the likelihood then grows without bound along ``d``) are errors
(:class:`~hiermeta.errors.DataDefectError`) naming the columns, or with ``separation="warn"`` a
:class:`~hiermeta.errors.SeparationWarning` and a fit whose estimates along ``d`` ran off.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
from scipy import optimize, stats

from ..errors import DataDefectError, EmpiricalBayesWarning, SeparationWarning
from .estimate import Estimate
from .family import Family, get_family
from .linalg import CrossProducts, Layout, PLSFactor, factorize
from .terms import MixedDesign, _lower_indices, relative_factors, theta_lower_bounds, theta_names, theta_start

__all__ = ["GLMM", "PIRLSResult", "Standardised", "standardise", "fit_glmm", "log_joint", "separation_direction",
           "MAX_AGQ"]

MAX_AGQ = 25  # as lme4 allows
SINGULAR_TOL = 1e-4  # lme4's isSingular tolerance on the diagonal of T


class PIRLSResult(NamedTuple):
    """The conditional mode at one ``(theta, beta)`` (standardised scale).

    Attributes:
      u: the spherical conditional modes (the layout's internal order); beta: the fixed effects
        (given, or updated jointly); eta, mu: at the mode.
      pdev: ``-2 sum log p(y | u) + ||u||^2`` at the mode; deviance: ``pdev + log|A|``
        (the Laplace ``-2 log L``; for ``nAGQ = 0`` lme4's criterion).
      factor: the PLS factorisation at the mode (weights at the mode).
      weights: the working weights at the mode.
      converged, iterations, message: PIRLS's own account.
    """

    u: np.ndarray
    beta: np.ndarray
    eta: np.ndarray
    mu: np.ndarray
    pdev: float
    deviance: float
    factor: PLSFactor
    weights: np.ndarray
    converged: bool
    iterations: int
    message: str


def _column_scales(X: np.ndarray) -> tuple:
    """``M`` with ``X M`` centred (when there is an intercept column) and unit-sd columns."""
    p = X.shape[1]
    M = np.eye(p)
    ones = [j for j in range(p) if np.allclose(X[:, j], 1.0)]
    intercept = ones[0] if ones else None
    for j in range(p):
        if j == intercept:
            continue
        col = X[:, j]
        sd = float(np.std(col))
        if sd > 0 and intercept is not None:
            M[j, j] = 1.0 / sd
            M[intercept, j] = -float(np.mean(col)) / sd
        else:
            scale = float(np.sqrt(np.mean(col**2)))
            M[j, j] = 1.0 / scale if scale > 0 else 1.0
    return M


class Standardised(NamedTuple):
    """A design on the standardised scale (module docstring): ``X_s = X M``, ``beta = M beta_s``;
    ``Z_s = Z D^-1`` per term (``column_scales`` the ``d``), ``T_s = D T`` so ``theta_s = theta * theta_scale``."""

    M: np.ndarray
    X: np.ndarray
    column_scales: list
    terms: tuple
    theta_scale: np.ndarray


def standardise(design: MixedDesign) -> Standardised:
    """The standardised copy of ``design``'s fixed and random-effect columns (the response is left alone)."""
    n = design.num_rows
    X = np.asarray(design.X, dtype=float).reshape(n, -1)
    if not np.all(np.isfinite(X)):
        raise DataDefectError("the fixed-effects design holds NaN or infinite values")
    M = _column_scales(X)
    scales, terms, theta_scale = [], [], []
    for t in design.terms:
        d = np.sqrt(np.mean(t.Z**2, axis=0))
        d = np.where(d > 0, d, 1.0)
        scales.append(d)
        terms.append(t._replace(Z=t.Z / d))
        rows, _ = _lower_indices(t)
        theta_scale.append(d[rows])
    return Standardised(M, X @ M, scales, tuple(terms),
                        np.concatenate(theta_scale) if theta_scale else np.zeros(0))


class GLMM:
    """A GLMM's data on the standardised scale and its criteria (PIRLS, Laplace, AGQ) there.

    ``design``: the :class:`~hiermeta.mixed.terms.MixedDesign` (binomial: proportions with the
    trials as weights); ``family``: a :class:`~hiermeta.mixed.family.Family` or its name.
    The response is checked by the family on construction.
    """

    def __init__(self, design: MixedDesign, family: Union[str, Family] = "binomial", link: Optional[str] = None):
        self.design = design
        self.family = get_family(family, link)
        if self.family.has_scale:
            raise ValueError("a Gaussian response is a linear mixed model: fit it by ML/REML (hiermeta.mixed.lmm), "
                             "not by the GLMM approximations")
        self.y, self.w = self.family.prepare(design.response, design.weights)
        n = design.num_rows
        self.offset = np.zeros(n) if design.offset is None else np.asarray(design.offset, dtype=float)
        std = standardise(design)
        self.M, self.X, self.column_scales, self.terms, self.theta_scale = std
        if self.X.shape[1] and np.linalg.matrix_rank(self.X) < self.X.shape[1]:
            raise DataDefectError(f"the fixed-effects design ({', '.join(design.fixed_names)}) is rank deficient "
                                  "on the rows used: some columns are linear combinations of others")
        self.layout = Layout(self.terms, n)
        self.num_theta = int(self.theta_scale.size)
        self.num_fixed = int(self.X.shape[1])
        self.lower = theta_lower_bounds(self.terms)
        self._no_fixed = np.zeros((n, 0))
        self._warm = {}

    # ------------------------------------------------------------------ scales
    def theta_to_standard(self, theta) -> np.ndarray:
        return np.asarray(theta, dtype=float) * self.theta_scale

    def theta_from_standard(self, theta_s) -> np.ndarray:
        return np.asarray(theta_s, dtype=float) / self.theta_scale

    def beta_to_standard(self, beta) -> np.ndarray:
        return np.linalg.solve(self.M, np.asarray(beta, dtype=float))

    def beta_from_standard(self, beta_s) -> np.ndarray:
        return self.M @ np.asarray(beta_s, dtype=float)

    # ------------------------------------------------------------------ pieces
    def random_predictor(self, factors, u) -> np.ndarray:
        """``Z Lambda u`` (standardised columns) for every row."""
        return self.layout.random_predictor(self.layout.per_term(self.layout.lambda_times(factors, u)))

    def penalised_deviance(self, eta, u) -> float:
        mu = self.family.inverse_link(eta)
        return float(-2.0 * np.sum(self.family.log_likelihood(self.y, mu, self.w)) + u @ u)

    def _working(self, eta, fixed_part):
        fam = self.family
        mu = fam.inverse_link(eta)
        d = fam.mu_eta(eta)
        weights = self.w * d**2 / np.maximum(fam.variance(mu), 1e-300)
        z = eta - fixed_part + (self.y - mu) / d
        return weights, z

    def pirls(self, theta_s, beta_s=None, start: Optional[tuple] = None, max_iter: int = 200) -> PIRLSResult:
        """The conditional mode at ``theta_s`` (and ``beta_s``, or ``beta`` updated jointly when None).

        ``start``: ``(u, beta)`` to start from (default: the last mode found for this kind of
        update, else ``u = 0`` and the family's starting mean).
        """
        joint = beta_s is None
        key = "joint" if joint else "fixed"
        factors = relative_factors(self.terms, theta_s)
        X = self.X if joint else self._no_fixed
        Q = self.layout.size
        if start is None:
            start = self._warm.get(key)
        if joint:
            fixed_of = lambda b: self.offset + self.X @ b  # noqa: E731
        else:
            beta_s = np.asarray(beta_s, dtype=float)
            base = self.offset + self.X @ beta_s
            fixed_of = lambda b: base  # noqa: E731
        if start is None or (joint and start[1] is None):
            # first step from the family's starting mean: the PLS solution at eta = g(mu_start)
            mu0 = self.family.start_mu(self.y, self.w)
            eta = self.family.link.link(mu0)
            weights, z = self._working(eta, self.offset if joint else base)
            f = factorize(self.layout, CrossProducts.build(self.layout, X, z, weights), theta_s)
            u, beta = f.u, (f.beta if joint else beta_s)
        else:
            u = np.asarray(start[0], dtype=float).copy()
            beta = (np.asarray(start[1], dtype=float).copy() if joint else beta_s)
        eta = fixed_of(beta) + self.random_predictor(factors, u)
        pdev = self.penalised_deviance(eta, u)
        converged, message, it, halving, size = False, "", 0, 0, np.inf
        for it in range(1, max_iter + 1):
            fixed = fixed_of(beta)
            weights, z = self._working(eta, self.offset if joint else fixed)
            f = factorize(self.layout, CrossProducts.build(self.layout, X, z, weights), theta_s)
            du = f.u - u
            db = (f.beta - beta) if joint else np.zeros(0)
            accepted = False
            for halving in range(21):
                step = 0.5**halving
                u_new, beta_new = u + step * du, (beta + step * db if joint else beta)
                eta_new = fixed_of(beta_new) + self.random_predictor(factors, u_new)
                pdev_new = self.penalised_deviance(eta_new, u_new)
                if np.isfinite(pdev_new) and pdev_new <= pdev + 1e-11 * (1.0 + abs(pdev)):
                    accepted = True
                    break
            if not accepted:
                message = "PIRLS: 20 step halvings did not lower the penalised deviance"
                break
            size = max(float(np.max(np.abs(step * du))) if du.size else 0.0,
                       float(np.max(np.abs(step * db))) if db.size else 0.0)
            change = abs(pdev - pdev_new)
            u, beta, eta, pdev = u_new, beta_new, eta_new, pdev_new
            if size < 1e-10 or change < 1e-13 * (1.0 + abs(pdev)):
                converged, message = True, f"PIRLS converged in {it} iteration(s)"
                break
        else:
            message = f"PIRLS: no convergence in {max_iter} iterations"
        # the factorisation at the mode (weights at the mode): log|A| and the conditional covariances;
        # after a full step below 1e-10 the last one's weights are those at the mode to that order
        if not (converged and halving == 0 and size < 1e-10):
            fixed = fixed_of(beta)
            weights, z = self._working(eta, self.offset if joint else fixed)
            f = factorize(self.layout, CrossProducts.build(self.layout, X, z, weights), theta_s)
        factor = f
        if converged:
            self._warm[key] = (u, beta if joint else None)
        mu = self.family.inverse_link(eta)
        return PIRLSResult(u, beta, eta, mu, pdev, pdev + factor.log_det_A, factor, weights, converged, it, message)

    # ------------------------------------------------------------------ criteria
    def laplace_deviance(self, theta_s, beta_s) -> float:
        """``-2 log L`` by the Laplace approximation at ``(theta_s, beta_s)`` (standardised scale)."""
        return self.pirls(theta_s, beta_s).deviance

    def agq_deviance(self, theta_s, beta_s, num_nodes: int) -> float:
        """``-2 log L`` by adaptive Gauss-Hermite quadrature with ``num_nodes`` nodes (one scalar term)."""
        return self.agq_levels(theta_s, beta_s, num_nodes)[0]

    def agq_levels(self, theta_s, beta_s, num_nodes: int) -> tuple:
        """``(-2 log L, per-level log L_l)`` by AGQ (module docstring); requires one scalar term."""
        self._require_scalar_term(num_nodes)
        res = self.pirls(theta_s, beta_s)
        term = self.terms[0]
        T = float(relative_factors(self.terms, theta_s)[0][0, 0])
        s = res.factor.lead_inv[:, 0, 0]  # A_ll^-1/2: the inverse of the 1 x 1 Cholesky factor
        u_mode = res.u  # one term: level-major, q = 1
        nodes, node_weights = np.polynomial.hermite_e.hermegauss(num_nodes)
        fixed = self.offset + self.X @ np.asarray(beta_s, dtype=float)
        zcol = term.Z[:, 0]
        codes = term.codes
        L = term.num_levels
        log_terms = np.empty((L, num_nodes))
        for k, (zk, wk) in enumerate(zip(nodes, node_weights)):
            uk = u_mode + s * zk  # (L,)
            eta = fixed + zcol * T * uk[codes]
            ll = self.family.log_likelihood(self.y, self.family.inverse_link(eta), self.w)
            per_level = np.bincount(codes, weights=ll, minlength=L)
            log_terms[:, k] = np.log(wk) + 0.5 * zk**2 + per_level - 0.5 * uk**2 - 0.5 * np.log(2 * np.pi)
        peak = log_terms.max(axis=1, keepdims=True)
        log_level = np.log(s) + peak[:, 0] + np.log(np.sum(np.exp(log_terms - peak), axis=1))
        return float(-2.0 * np.sum(log_level)), log_level

    def _require_scalar_term(self, num_nodes: int) -> None:
        if len(self.terms) != 1 or self.terms[0].num_columns != 1:
            raise ValueError("adaptive Gauss-Hermite quadrature (nAGQ > 1) needs exactly one random-effect term "
                             f"with one column (lme4's rule); this model has {[t.label() for t in self.design.terms]}")
        if not 1 <= int(num_nodes) <= MAX_AGQ:
            raise ValueError(f"nAGQ must be between 1 and {MAX_AGQ}, got {num_nodes}")

    def criterion(self, nagq: int):
        """``(theta_s, beta_s) -> -2 log L`` for ``nagq`` (1: Laplace, > 1: AGQ)."""
        if nagq <= 1:
            return self.laplace_deviance
        return lambda theta_s, beta_s: self.agq_deviance(theta_s, beta_s, nagq)


def log_joint(design: MixedDesign, family: Union[str, Family], beta, b: Sequence, covariances: Sequence,
              scale: Optional[float] = None) -> float:
    """The host engine's log joint density ``log p(y | beta, b) + sum_k sum_l log N(b_kl; 0, Sigma_k)``.

    ``b``: one ``(L_k, q_k)`` array per term, ``covariances``: the ``Sigma_k``, on the original
    scale; ``scale``: the residual sd of a Gaussian response.  The NumPyro model
    (:mod:`hiermeta.mixed.numpyro_model`) is tested against this.
    """
    fam = get_family(family)
    y, w = fam.prepare(design.response, design.weights)
    layout = Layout(design.terms, design.num_rows)
    offset = np.zeros(design.num_rows) if design.offset is None else np.asarray(design.offset, dtype=float)
    eta = np.asarray(design.X, dtype=float) @ np.asarray(beta, dtype=float) + offset + layout.random_predictor(b)
    total = float(np.sum(fam.log_likelihood(y, fam.inverse_link(eta), w, scale)))
    for bk, S in zip(b, covariances):
        total += float(np.sum(stats.multivariate_normal(np.zeros(S.shape[0]), S, allow_singular=False).logpdf(
            np.asarray(bk, dtype=float))))
    return total


# ---------------------------------------------------------------------------- checks before fitting


def separation_direction(X: np.ndarray, y: np.ndarray, upper: Optional[float] = 1.0) -> Optional[np.ndarray]:
    """A direction ``d`` of (complete or quasi-complete) separation of ``X`` by ``y``, or None.

    ``X d`` must be ``>= 0`` on the rows where ``y`` is at its maximum ``upper`` (1 for a
    proportion; None for counts, which have none), ``<= 0`` where ``y = 0`` and ``= 0`` on the other
    rows; a non-zero such ``X d`` makes the GLM log-likelihood increase without bound along
    ``d`` (and with random effects too: each conditional likelihood increases).  Found by the
    linear programme ``max sum |x_i d|`` over the sign-constrained rows, ``|d_j| <= 1`` (Konis
    2007); the returned ``d`` has ``max |X d| = 1``.
    """
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    n, p = X.shape
    if p == 0:
        return None
    sign = np.zeros(n)
    sign[y == 0] = -1.0
    if upper is not None:
        sign[y == upper] = 1.0
    constrained = sign != 0
    if not constrained.any():
        return None
    # maximise sum_i sign_i x_i d  s.t.  sign_i x_i d >= 0 (constrained rows), x_i d = 0 (others)
    c = -(sign[constrained, None] * X[constrained]).sum(axis=0)
    A_ub = -(sign[constrained, None] * X[constrained])
    free = ~constrained
    res = optimize.linprog(c, A_ub=A_ub, b_ub=np.zeros(A_ub.shape[0]),
                           A_eq=X[free] if free.any() else None, b_eq=np.zeros(int(free.sum())) if free.any() else None,
                           bounds=[(-1.0, 1.0)] * p, method="highs")
    if res.status != 0 or res.x is None:
        return None
    d = res.x
    Xd = X @ d
    scale = float(np.max(np.abs(Xd)))
    if scale < 1e-7:
        return None
    return d / scale


def _strictly_separated(X: np.ndarray, y: np.ndarray, upper: float) -> bool:
    """Complete separation: ``max t`` s.t. ``sign_i x_i d >= t`` on every row, ``|d_j| <= 1``, is positive."""
    sign = np.where(y == upper, 1.0, np.where(y == 0, -1.0, 0.0))
    if np.any(sign == 0):
        return False
    n, p = X.shape
    # variables (d, t): maximise t subject to t - sign_i x_i d <= 0
    A_ub = np.column_stack([-(sign[:, None] * X), np.ones(n)])
    res = optimize.linprog(np.r_[np.zeros(p), -1.0], A_ub=A_ub, b_ub=np.zeros(n),
                           bounds=[(-1.0, 1.0)] * p + [(None, 1.0)], method="highs")
    return bool(res.status == 0 and -res.fun > 1e-9)


def _check_response(glmm: GLMM, separation: str) -> list:
    """All-equal responses and separation (module docstring); returns notes for the warnings issued."""
    y, fam = glmm.y, glmm.family
    upper = 1.0 if fam.name in ("binomial", "bernoulli") else None
    names = glmm.design.fixed_names
    n = y.shape[0]
    if np.all(y == 0) or (upper is not None and np.all(y == upper)):
        what = "0" if np.all(y == 0) else "1 (every trial a success)"
        raise DataDefectError(f"all {n} responses are {what}: the intercept's estimate is infinite and the "
                              "random-effect variances are not identified; there is nothing to fit")
    d_s = separation_direction(glmm.X, y, upper)
    if d_s is None:
        return []
    d = glmm.M @ d_s  # the direction in the original columns
    involved = [names[j] for j in np.flatnonzero(np.abs(d) > 1e-6 * np.max(np.abs(d)))]
    Xd = glmm.X @ d_s
    rows = int(np.sum(np.abs(Xd) > 1e-7))
    complete = upper is not None and _strictly_separated(glmm.X, y, upper)
    kind = "complete" if complete else "quasi-complete"
    message = (f"{kind} separation in the fixed effects: along a direction of the columns {involved} the linear "
               f"predictor moves only rows whose response is already at its bound ({rows} of {n} rows), so the "
               "likelihood grows without bound and those estimates (and their standard errors) are infinite; "
               "drop or merge the columns, or use a prior (NUTS)")
    if separation == "error":
        raise DataDefectError(message)
    if separation == "warn":
        warnings.warn(message, SeparationWarning, stacklevel=3)
        return [message]
    return []


# ---------------------------------------------------------------------------- the fit


def _minimise(f, x0, bounds, max_iter: int, jac: str = "2-point", ftol: float = 1e-12, gtol: float = 1e-6):
    """L-BFGS-B with finite-difference gradients (the polish and the Hessian come after, in :func:`_estimate`)."""
    return optimize.minimize(f, x0, method="L-BFGS-B", jac=jac, bounds=bounds,
                             options=dict(maxiter=max_iter, ftol=ftol, gtol=gtol, maxfun=50 * max_iter))


def _finite_difference_hessian(f, x, free, h: float = 1e-3):
    """Central-difference Hessian of ``f`` at ``x`` over the coordinates ``free`` (and the gradient)."""
    idx = np.flatnonzero(free)
    m = idx.size
    f0 = f(x)
    H = np.zeros((m, m))
    g = np.zeros(m)
    plus, minus = np.zeros(m), np.zeros(m)
    for a, i in enumerate(idx):
        e = np.zeros_like(x)
        e[i] = h
        plus[a], minus[a] = f(x + e), f(x - e)
        g[a] = (plus[a] - minus[a]) / (2 * h)
        H[a, a] = (plus[a] - 2 * f0 + minus[a]) / h**2
    for a in range(m):
        for b in range(a + 1, m):
            ea, eb = np.zeros_like(x), np.zeros_like(x)
            ea[idx[a]], eb[idx[b]] = h, h
            H[a, b] = H[b, a] = (f(x + ea + eb) - f(x + ea - eb) - f(x - ea + eb) + f(x - ea - eb)) / (4 * h * h)
    return H, g, f0


def fit_glmm(design: MixedDesign, family: Union[str, Family] = "binomial", link: Optional[str] = None, *,
             nagq: int = 1, separation: str = "error", max_iter: int = 500,
             start: Optional[dict] = None) -> Estimate:
    """Maximum likelihood of a GLMM by lme4's ``nAGQ``: 0 (PIRLS over ``(u, beta)``, ``theta`` optimised),
    1 (Laplace, the default) or up to 25 (adaptive Gauss-Hermite quadrature, one scalar term).

    Args:
      design: the model's data (:class:`~hiermeta.mixed.terms.MixedDesign`); binomial responses are
        proportions with the trials as ``weights``, or 0/1 (or boolean) with unit weights.
      family, link: :mod:`hiermeta.mixed.family` (``"binomial"``, ``"bernoulli"``, ``"poisson"``).
      nagq: lme4's ``nAGQ``.
      separation: ``"error"`` (default) raises :class:`~hiermeta.errors.DataDefectError` when the
        fixed effects are separated; ``"warn"`` warns and fits anyway.
      start: ``{"theta": ..., "beta": ...}`` on the original scale (default: lme4's, ``T_k = I`` and
        the ``nAGQ = 0`` fit).

    Returns an :class:`~hiermeta.mixed.estimate.Estimate` (``sigma`` None; ``objective`` is
    ``-2 log L``, lme4's ``deviance`` of a GLMM fit).  Non-convergence (optimiser or PIRLS), a
    Hessian that is not positive definite and a boundary fit are in ``converged``/``notes``/
    ``singular`` and each issued as an :class:`~hiermeta.errors.EmpiricalBayesWarning`.
    """
    if separation not in ("error", "warn", "ignore"):
        raise ValueError(f"separation must be 'error', 'warn' or 'ignore', got {separation!r}")
    nagq = int(nagq)
    glmm = GLMM(design, family, link)
    if nagq > 1:
        glmm._require_scalar_term(nagq)
    elif nagq < 0:
        raise ValueError(f"nAGQ must be >= 0, got {nagq}")
    notes = _check_response(glmm, separation)
    q, p = glmm.num_theta, glmm.num_fixed
    theta_bounds = [(0.0 if np.isfinite(lo) else None, None) for lo in glmm.lower]
    start = dict(start or {})
    theta0 = glmm.theta_to_standard(start["theta"]) if "theta" in start else theta_start(glmm.terms)
    evaluations = 0

    # stage 1 (nAGQ = 0): theta, with beta updated inside PIRLS
    def stage1(theta_s):
        nonlocal evaluations
        evaluations += 1
        value = glmm.pirls(theta_s).deviance
        return value if np.isfinite(value) else np.inf

    if "beta" in start and nagq > 0:
        theta_s = theta0
        beta_s = glmm.beta_to_standard(start["beta"])
        stage1_message = "started from the given theta and beta"
    else:
        res1 = _minimise(stage1, theta0, theta_bounds, max_iter, ftol=1e-9 if nagq > 0 else 1e-12)
        theta_s = np.maximum(res1.x, np.where(np.isfinite(glmm.lower), 0.0, -np.inf))
        mode = glmm.pirls(theta_s)
        beta_s = mode.beta
        stage1_message = f"nAGQ=0: {res1.message}"
        if nagq == 0:
            return _estimate(glmm, "PIRLS (nAGQ=0)", theta_s, beta_s, mode, res1.success and mode.converged,
                             evaluations, stage1_message, notes, criterion=None)

    # stage 2: (theta, beta) jointly, beta fixed inside PIRLS
    crit = glmm.criterion(nagq)

    def stage2(x):
        nonlocal evaluations
        evaluations += 1
        th, be = x[:q], x[q:]
        value = crit(th, be)
        return value if np.isfinite(value) else np.inf

    bounds = theta_bounds + [(None, None)] * p
    res2 = _minimise(stage2, np.concatenate([theta_s, beta_s]), bounds, max_iter)
    x = res2.x.copy()
    x[:q] = np.maximum(x[:q], np.where(np.isfinite(glmm.lower), 0.0, -np.inf))
    method = "Laplace" if nagq == 1 else f"AGQ({nagq})"
    return _estimate(glmm, method, x[:q], x[q:], None, bool(res2.success), evaluations,
                     f"{stage1_message}; nAGQ={nagq}: {res2.message}", notes, criterion=stage2)


def _estimate(glmm: GLMM, method: str, theta_s, beta_s, mode: Optional[PIRLSResult], optimiser_ok: bool,
              evaluations: int, message: str, notes: list, criterion) -> Estimate:
    """Everything an :class:`Estimate` holds, at the optimum (standardised scale in, original scale out)."""
    notes = list(notes)
    q, p = glmm.num_theta, glmm.num_fixed
    on_boundary = np.isfinite(glmm.lower) & (np.abs(theta_s) < SINGULAR_TOL)
    x = np.concatenate([theta_s, beta_s])
    covariance_source = "RX"
    if criterion is not None:
        # Hessian of -2 log L over (theta, beta), boundary theta held fixed; one Newton step to polish
        free = np.concatenate([~on_boundary, np.ones(p, bool)])
        H, g, f0 = _finite_difference_hessian(criterion, x, free)
        try:
            np.linalg.cholesky(H)
            pd = True
        except np.linalg.LinAlgError:
            pd = False
        if pd:
            step = np.zeros_like(x)
            step[free] = -np.linalg.solve(H, g)
            trial = x + step
            trial[:q] = np.where(np.isfinite(glmm.lower), np.maximum(trial[:q], 0.0), trial[:q])
            if np.max(np.abs(step)) < 1e-2 and criterion(trial) < f0:
                x = trial
                theta_s, beta_s = x[:q], x[q:]
            cov_s = np.zeros((q + p, q + p))
            cov_s[np.ix_(free, free)] = 2.0 * np.linalg.inv(H)
            beta_cov_s = cov_s[q:, q:]
            covariance_source = "Hessian"
        else:
            notes.append("the Hessian of -2 log L over (theta, beta) is not positive definite at the optimum: "
                         "the fixed effects' covariance falls back to the PLS system's (R_X'R_X)^-1, which "
                         "treats theta as known")
        gradient_norm = float(np.max(np.abs(g))) if g.size else 0.0
    else:
        gradient_norm = 0.0
    mode = glmm.pirls(theta_s, beta_s) if mode is None or criterion is not None else mode
    # the joint PLS system at the mode for R_X (also the fallback covariance)
    fixed_mode = glmm.pirls(theta_s, None, start=(mode.u, beta_s)) if covariance_source == "RX" else None
    if covariance_source == "RX":
        beta_cov_s = np.linalg.inv(fixed_mode.factor.fixed_precision) if p else np.zeros((0, 0))
    deviance = float(criterion(x) if criterion is not None else mode.deviance)
    theta = glmm.theta_from_standard(theta_s)
    beta = glmm.beta_from_standard(beta_s)
    beta_cov = glmm.M @ beta_cov_s @ glmm.M.T
    factors_s = relative_factors(glmm.terms, theta_s)
    b_s = glmm.layout.per_term(glmm.layout.lambda_times(factors_s, mode.u))
    cov_b_s = mode.factor.conditional_covariances(glmm.layout, factors_s)
    b, b_cov = [], []
    for d, bk, ck in zip(glmm.column_scales, b_s, cov_b_s):
        b.append(bk / d)
        b_cov.append(ck / np.outer(d, d))
    names = theta_names(glmm.design.terms)
    singular = tuple(n for n, s in zip(names, on_boundary) if s)
    converged = bool(optimiser_ok and mode.converged and np.isfinite(deviance))
    if not mode.converged:
        notes.append(f"the conditional modes did not converge at the optimum: {mode.message}")
    if not optimiser_ok:
        notes.append(f"the optimiser did not report convergence: {message}")
    if gradient_norm > 1e-2:
        notes.append(f"the gradient of -2 log L at the optimum is {gradient_norm:.2g} (standardised scale): "
                     "the optimiser stopped away from a stationary point")
        converged = False
    if singular:
        notes.append(f"boundary (singular) fit: {', '.join(singular)} at 0")
    for note in notes:
        if "separation" not in note:
            warnings.warn(note, EmpiricalBayesWarning, stacklevel=3)
    return Estimate(
        method=method,
        theta=theta,
        beta=beta,
        beta_cov=beta_cov,
        sigma=None,
        b=b,
        b_cov=b_cov,
        loglik=-0.5 * deviance,
        objective=deviance,
        num_params=int(p + glmm.num_theta),
        converged=converged,
        iterations=int(evaluations),
        message=f"{message}; fixed-effect covariance from the {covariance_source}"
                + ("" if covariance_source == "RX" else " of -2 log L over (theta, beta)"),
        singular=singular,
        notes=tuple(notes),
    )
