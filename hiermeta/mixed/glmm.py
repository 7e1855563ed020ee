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
It stops when the accepted step is below ``STEP_TOL = 1e-7`` (every coordinate) or ``pdev``
stops changing (``1e-15`` relative); for a canonical link this is Newton's method (quadratic
convergence: after a step ``s`` the mode is about ``s^2`` away), and the weights are then
recomputed at the point reached: ``log|A|`` is not stationary at the mode, so the criterion's
error is linear in the distance to it, and the finite differences of the optimiser's check (steps
of 1e-4) need it below about 1e-11.

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
Both on the standardised scale of :mod:`~hiermeta.mixed.scaling` (a covariate in metres and one
in kilometres give the same path) by :func:`~hiermeta.mixed.optimize.minimize_bounded` (L-BFGS-B
with forward-difference gradients, whose evaluations cost no optimiser work of their own; then
for the last stage a central-difference check of the gradient and Hessian, Newton polish,
restarts).

**Fixed-effect covariance**: as lme4 for ``nAGQ > 0``: ``2 H^-1`` restricted to ``beta``, ``H``
the Hessian of ``-2 log L`` over ``(theta, beta)`` (the optimiser's central-difference check,
standardised scale, mapped back); covariance parameters held on their bound are left out of
``H``.  When ``H`` is not positive definite (or for ``nAGQ = 0``) the PLS system's
``(R_X'R_X)^-1`` at the mode is used instead (lme4's fallback), and the result says so.
**Conditional modes** ``b = Lambda u*`` with conditional covariances ``Lambda A^-1 Lambda'``
(lme4's ``ranef(condVar = TRUE)``).

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
from scipy import optimize

from ..errors import DataDefectError, EmpiricalBayesWarning, SeparationWarning
from .estimate import Estimate
from .family import Family, get_family
from .checks import check_response, drop_dependent_columns
from .linalg import CrossProducts, Layout, PLSFactor, factorize
from .lmm import singular_parameters
from .optimize import blas_threads, minimize_bounded
from .scaling import standardize
from .terms import MixedDesign, relative_factors, theta_lower_bounds, theta_start

__all__ = ["GLMM", "PIRLSResult", "fit_glmm", "log_joint", "separation_direction", "MAX_AGQ", "APPROXIMATIONS"]

MAX_AGQ = 25  # as lme4 allows
LIFT = 0.1  # stage 2 starts the standard deviations (relative, standardised scale) at least here
STEP_TOL = 1e-7  # PIRLS stops after a Newton step below this (every coordinate): the mode is then ~1e-14 away


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


class GLMM:
    """A GLMM's data on the standardised scale and its criteria (PIRLS, Laplace, AGQ) there.

    ``design``: the :class:`~hiermeta.mixed.terms.MixedDesign` (binomial: proportions with the
    trials as weights); ``family``: a :class:`~hiermeta.mixed.family.Family` or its name.
    The response is checked by the family on construction; ``X``, ``terms`` are the standardised
    design's and ``scaling`` (:class:`~hiermeta.mixed.scaling.Standardization`) maps back.
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
        std_design, self.scaling = standardize(design)
        self.X, self.terms = std_design.X, std_design.terms
        self.layout = Layout(self.terms, n)
        self.num_theta = int(sum(t.num_theta for t in self.terms))
        self.num_fixed = int(self.X.shape[1])
        self.lower = theta_lower_bounds(self.terms)
        self._no_fixed = np.zeros((n, 0))
        self._warm = {}
        # -2 log p(y | mu) = sum of deviance residuals + -2 log p(y | mu = y) (the saturated model): the
        # residuals are cheaper than the log-likelihood with its constants (log-gamma), PIRLS's inner loop
        self._saturated = float(-2.0 * np.sum(self.family.log_likelihood(self.y, self.y, self.w)))

    # ------------------------------------------------------------------ pieces
    def random_predictor(self, factors, u) -> np.ndarray:
        """``Z Lambda u`` (standardised columns) for every row."""
        return self.layout.design_times(self.layout.lambda_times(factors, u))

    def penalised_deviance(self, eta, u) -> float:
        """``-2 sum_i log p(y_i | eta_i) + ||u||^2`` (with every constant of the log-likelihood)."""
        return self._penalised_deviance(self.family.inverse_link(eta), u)

    def _penalised_deviance(self, mu, u) -> float:
        return float(np.sum(self.family.deviance_residuals(self.y, mu, self.w)) + self._saturated + u @ u)

    def _working(self, eta, fixed_part, mu=None):
        """PIRLS's working weights and response at ``eta`` (``mu``: the mean there, if known)."""
        fam = self.family
        mu = fam.inverse_link(eta) if mu is None else mu
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
            weights, z = self._working(eta, self.offset if joint else base, mu0)
            f = factorize(self.layout, CrossProducts.build(self.layout, X, z, weights), theta_s)
            u, beta = f.u, (f.beta if joint else beta_s)
        else:
            u = np.asarray(start[0], dtype=float).copy()
            beta = (np.asarray(start[1], dtype=float).copy() if joint else beta_s)
        eta = fixed_of(beta) + self.random_predictor(factors, u)
        mu = self.family.inverse_link(eta)
        pdev = self._penalised_deviance(mu, u)
        converged, message, it, halving, size = False, "", 0, 0, np.inf
        for it in range(1, max_iter + 1):
            weights, z = self._working(eta, self.offset if joint else base, mu)
            f = factorize(self.layout, CrossProducts.build(self.layout, X, z, weights), theta_s)
            du = f.u - u
            db = (f.beta - beta) if joint else np.zeros(0)
            d_eta = self.random_predictor(factors, du) + (self.X @ db if joint else 0.0)  # eta is linear in (u, beta)
            accepted = False
            for halving in range(21):
                step = 0.5**halving
                eta_new = eta + step * d_eta
                mu_new = self.family.inverse_link(eta_new)
                u_new = u + step * du
                pdev_new = self._penalised_deviance(mu_new, u_new)
                if np.isfinite(pdev_new) and pdev_new <= pdev + 1e-11 * (1.0 + abs(pdev)):
                    accepted = True
                    break
            if not accepted:
                message = "PIRLS: 20 step halvings did not lower the penalised deviance"
                break
            size = max(float(np.max(np.abs(step * du))) if du.size else 0.0,
                       float(np.max(np.abs(step * db))) if db.size else 0.0)
            change = abs(pdev - pdev_new)
            u, eta, mu, pdev = u_new, eta_new, mu_new, pdev_new
            if joint:
                beta = beta + step * db
            if size < STEP_TOL or change <= 1e-15 * (1.0 + abs(pdev)):
                converged, message = True, f"PIRLS converged in {it} iteration(s)"
                break
        else:
            message = f"PIRLS: no convergence in {max_iter} iterations"
        # the factorisation at the mode (weights at the mode): log|A| and the conditional covariances.
        # The last one's weights are those of the point before the last step; log|A| is not stationary at
        # the mode (pdev is), so weights a step s away would shift it by O(s) (1e-8 here moved it 1e-6)
        if size > 0.0:
            weights, z = self._working(eta, self.offset if joint else base, mu)
            f = factorize(self.layout, CrossProducts.build(self.layout, X, z, weights), theta_s)
        factor = f
        if converged:
            self._warm[key] = (u, beta if joint else None)
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
    from scipy import stats  # not on the fitting path: scipy.stats costs ~0.4 s to import

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
    """All-equal responses (:func:`hiermeta.mixed.checks.check_response`) and separation (module
    docstring); returns the notes of the warnings issued."""
    y, fam = glmm.y, glmm.family
    binomial = fam.name in ("binomial", "bernoulli")
    check_response(glmm.design._replace(response=y), "binomial" if binomial else fam.name)
    upper = 1.0 if binomial else None
    names = glmm.design.fixed_names
    n = y.shape[0]
    d_s = separation_direction(glmm.X, y, upper)
    if d_s is None:
        return []
    d = glmm.scaling.A @ d_s  # the direction in the original columns
    involved = [names[j] for j in np.flatnonzero(np.abs(d) > 1e-6 * np.max(np.abs(d)))]
    rows = int(np.sum(np.abs(glmm.X @ d_s) > 1e-7))
    kind = "complete" if upper is not None and _strictly_separated(glmm.X, y, upper) else "quasi-complete"
    message = (f"{kind} separation in the fixed effects: along a direction of the columns {involved} the linear "
               f"predictor moves only rows whose response is already at its bound ({rows} of {n} rows), so the "
               "likelihood grows without bound and those estimates (and their standard errors) are infinite; "
               "drop or merge the columns, or use a prior (NUTS)")
    if separation == "error":
        raise DataDefectError(message)
    if separation == "warn":
        warnings.warn(message, SeparationWarning, stacklevel=4)
        return [message]
    return []


# ---------------------------------------------------------------------------- the fit

APPROXIMATIONS = ("laplace", "agq", "pirls")


def fit_glmm(design: MixedDesign, family: Union[str, Family] = "binomial", link: Optional[str] = None, *,
             approximation: str = "laplace", num_nodes: Optional[int] = None, start=None,
             separation: str = "error", threads: Optional[int] = 1, warn: bool = True,
             max_evaluations: int = 10000) -> Estimate:
    """Maximum likelihood of a GLMM by lme4's ``nAGQ``: ``approximation="laplace"`` (``nAGQ = 1``, the
    default), ``"agq"`` (``nAGQ = num_nodes``, default 25; one scalar random-effect term) or
    ``"pirls"`` (``nAGQ = 0``: ``beta`` inside PIRLS, only ``theta`` optimised).

    Args:
      design: the model's data (:class:`~hiermeta.mixed.terms.MixedDesign`); binomial responses are
        proportions with the trials as ``weights``, or 0/1 (or boolean) with unit weights.  A
        rank-deficient fixed design is refused (:func:`hiermeta.mixed.checks.drop_dependent_columns`;
        :func:`hiermeta.mixed_model` drops the dependent columns first, as lme4).
      family, link: :mod:`hiermeta.mixed.family` (``"binomial"``, ``"bernoulli"``, ``"poisson"``).
      start: ``theta`` (original scale), or ``{"theta": ..., "beta": ...}`` to start the last
        stage there (default: lme4's, ``T_k = I`` and the ``nAGQ = 0`` fit).
      separation: ``"error"`` (default) raises :class:`~hiermeta.errors.DataDefectError` when the
        fixed effects are separated; ``"warn"`` warns and fits anyway.
      threads: BLAS threads during the fit (:func:`~hiermeta.mixed.optimize.blas_threads`).
      warn: issue the warnings (they are recorded in ``notes`` in any case).

    Both stages minimise with :func:`~hiermeta.mixed.optimize.minimize_bounded` (L-BFGS-B; for the
    last stage a central-difference check, Newton polish) on the standardised scale; the last stage's check
    Hessian gives the fixed effects' covariance (module docstring).  Returns an
    :class:`~hiermeta.mixed.estimate.Estimate` (``sigma`` None; ``objective`` is ``-2 log L``,
    lme4's ``deviance`` of a GLMM).  Non-convergence (optimiser or PIRLS), a Hessian that is not
    positive definite and a boundary fit are in ``converged``/``notes``/``singular`` and each
    issued as an :class:`~hiermeta.errors.EmpiricalBayesWarning`.
    """
    if separation not in ("error", "warn", "ignore"):
        raise ValueError(f"separation must be 'error', 'warn' or 'ignore', got {separation!r}")
    approximation = str(approximation).lower()
    if approximation not in APPROXIMATIONS:
        raise ValueError(f"approximation must be one of {APPROXIMATIONS}, got {approximation!r}")
    nagq = {"laplace": 1, "pirls": 0}.get(approximation, MAX_AGQ if num_nodes is None else int(num_nodes))
    if approximation != "agq" and num_nodes not in (None, 1 if approximation == "laplace" else 0):
        raise ValueError(f"num_nodes={num_nodes} applies to approximation='agq' only")
    drop_dependent_columns(design, "error")
    glmm = GLMM(design, family, link)
    if approximation == "agq":
        glmm._require_scalar_term(nagq)
    with blas_threads(threads):
        return _fit(glmm, nagq, start, separation, warn, max_evaluations)


def _fit(glmm: GLMM, nagq: int, start, separation: str, warn: bool, max_evaluations: int) -> Estimate:
    notes = _check_response(glmm, separation)
    q, p = glmm.num_theta, glmm.num_fixed
    lower = glmm.lower
    start = {"theta": start} if start is not None and not isinstance(start, dict) else dict(start or {})
    theta0 = glmm.scaling.theta_s(np.asarray(start["theta"], dtype=float)) if "theta" in start \
        else theta_start(glmm.terms)
    evaluations = 0

    if "beta" in start and nagq > 0:
        theta_s, beta_s = theta0, glmm.scaling.beta_s(np.asarray(start["beta"], dtype=float))
        messages = ["started from the given theta and beta"]
    else:  # stage 1 (nAGQ = 0): theta, with beta updated inside PIRLS
        # only a start for nAGQ >= 1 (as lme4's nAGQ0initStep): checked only when it is the fit
        opt1 = minimize_bounded(lambda th: glmm.pirls(th).deviance, theta0, lower, max_evaluations=max_evaluations,
                                check=nagq == 0, method="l-bfgs-b")
        evaluations += opt1.evaluations
        theta_s = np.maximum(opt1.x, lower)
        mode = glmm.pirls(theta_s)
        beta_s = mode.beta
        messages = [f"nAGQ=0: {opt1.message}"]
        if nagq == 0:
            return _estimate(glmm, "PIRLS (nAGQ=0)", theta_s, beta_s, mode, opt1, evaluations, messages, notes,
                             None, warn)
        # a standard deviation this stage left at (or near) its bound 0 starts stage 2 at LIFT: from the bound
        # L-BFGS-B's projected quasi-Newton steps wandered (ohio's (age | id): 570 evaluations, trial points
        # 7e4 above the optimum, against about 200 from 0.1); a variance whose optimum is 0 goes back there
        theta_s = np.where(np.isfinite(lower), np.maximum(theta_s, LIFT), theta_s)

    # stage 2: (theta, beta) jointly, beta fixed inside PIRLS
    crit = glmm.criterion(nagq)
    opt2 = minimize_bounded(lambda x: crit(x[:q], x[q:]), np.concatenate([theta_s, beta_s]),
                            np.concatenate([lower, np.full(p, -np.inf)]), max_evaluations=max_evaluations,
                            method="l-bfgs-b")
    evaluations += opt2.evaluations
    x = opt2.x
    messages.append(f"nAGQ={nagq}: {opt2.message}")
    method = "Laplace" if nagq == 1 else f"AGQ({nagq})"
    return _estimate(glmm, method, np.maximum(x[:q], lower), x[q:], None, opt2, evaluations, messages, notes,
                     opt2.hessian, warn)


def _estimate(glmm: GLMM, method: str, theta_s, beta_s, mode: Optional[PIRLSResult], opt, evaluations: int,
              messages: list, notes: list, hessian: Optional[np.ndarray], warn: bool) -> Estimate:
    """Everything an :class:`Estimate` holds at the optimum (standardised scale in, original scale out).

    ``hessian``: the optimiser's check Hessian of ``-2 log L`` over ``(theta, beta)`` (NaN off its
    free coordinates): ``2 H^-1`` restricted to ``beta`` is the fixed effects' covariance; without
    one, or when it is not positive definite, the PLS system's ``(R_X'R_X)^-1`` at the mode.
    """
    notes = list(notes)
    q, p = glmm.num_theta, glmm.num_fixed
    if mode is None:
        mode = glmm.pirls(theta_s, beta_s)
    beta_cov_s, source = None, "the PLS system's (R_X'R_X)^-1 (theta treated as known)"
    if hessian is not None and p:
        free = ~np.isnan(np.diag(hessian))
        if free[q:].all():
            H = hessian[np.ix_(free, free)]
            try:
                np.linalg.cholesky(H)
                cov = 2.0 * np.linalg.inv(H)
                beta_cov_s = cov[-p:, -p:]
                source = "the Hessian of -2 log L over (theta, beta)"
            except np.linalg.LinAlgError:
                notes.append("the Hessian of -2 log L over (theta, beta) is not positive definite at the optimum: "
                             "the fixed effects' covariance falls back to the PLS system's (R_X'R_X)^-1, which "
                             "treats theta as known")
    if beta_cov_s is None:
        joint = glmm.pirls(theta_s, None, start=(mode.u, beta_s))
        beta_cov_s = np.linalg.inv(joint.factor.fixed_precision) if p else np.zeros((0, 0))
    deviance = float(mode.deviance if method.startswith("PIRLS") or method == "Laplace" else opt.value)
    scaling = glmm.scaling
    factors_s = relative_factors(glmm.terms, theta_s)
    b = scaling.effects(glmm.layout.per_term(glmm.layout.lambda_times(factors_s, mode.u)))
    b_cov = scaling.effect_covariances(mode.factor.conditional_covariances(glmm.layout, factors_s))
    singular, singular_text = singular_parameters(glmm.terms, theta_s)
    converged = bool(opt.converged and mode.converged and np.isfinite(deviance))
    if not mode.converged:
        notes.append(f"the conditional modes did not converge at the optimum: {mode.message}")
    if not opt.converged:
        notes.append(f"the optimiser did not pass the convergence check after {evaluations} evaluations "
                     f"({opt.message}); the estimates may not be the optimum")
    if singular:
        notes.append("boundary (singular) fit: " + "; ".join(singular_text))
    if warn:
        for note in notes:
            if "separation" not in note:
                warnings.warn(note, EmpiricalBayesWarning, stacklevel=4)
    return Estimate(
        method=method,
        theta=scaling.theta(theta_s),
        beta=scaling.beta(beta_s),
        beta_cov=scaling.beta_cov(beta_cov_s),
        sigma=None,
        b=b,
        b_cov=b_cov,
        loglik=-0.5 * deviance,
        objective=deviance,
        num_params=int(p + q),
        converged=converged,
        iterations=int(evaluations),
        message="; ".join(messages) + f"; fixed-effect covariance from {source}",
        singular=singular,
        notes=tuple(notes),
    )
