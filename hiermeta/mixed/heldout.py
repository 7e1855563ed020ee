"""Held-out rows of a fitted mixed model, their predictive distributions under each method, and scores.

Every predictive here is a mixture over draws ``s`` of the linear predictor of the held-out rows,
``eta_s`` ``(S, m)`` (with a residual sd ``sigma_s`` for a Gaussian model), weighted per *unit*
(the levels of one grouping factor in the held-out rows, or their rows one by one):

* **MAP plug-in**: one draw, ``eta = X beta_hat + offset + Z b_hat`` (a level not in the fit: 0);
* **EB posterior** of the random effects at the fit's ``(beta, theta)``:

  - ``"laplace"``: ``u ~ N(u*, A^-1)`` jointly over every level of every term (``A`` the PLS
    matrix at the conditional mode; exact for a Gaussian model, where ``A`` carries ``sigma^2``),
    drawn through the blocked factor of :mod:`hiermeta.mixed.linalg`
    (``u_R = u*_R + C e_R``, ``C C' = S^-1``; ``u_B = u*_B + L_B^-T (e_B - F (u_R - u*_R))``);
  - ``"importance"``: the same draws widened by ``inflate`` and weighted by
    ``p(y | u) N(u; 0, I) / q(u)`` (self-normalised; consistent as the number of draws grows); the
    mean of the unnormalised weights also estimates the marginal likelihood (:func:`importance_log_likelihood`);
  - ``"quadrature"`` (one scalar random-effect term): per level the ``K`` adaptive Gauss-Hermite
    nodes ``u*_l + s_l z_k`` of :mod:`hiermeta.mixed.glmm` with weights
    ``w_k e^{z_k^2/2} p(y_l | u_lk) phi(u_lk)``: the level's posterior exactly up to quadrature error;
  - ``"exact"`` (Gaussian): the predictive of a unit's held-out rows in closed form,
    ``N(X beta + Z b_hat, Z C Z' + sigma^2 W^-1)`` with ``C`` the conditional covariance of the
    random effects they touch (from ``A^-1``; a new level: its prior ``Sigma_k``);

  a level not in the fit draws its effect from ``N(0, Sigma_k)`` in every method but the plug-in;
* **NUTS**: the posterior draws of ``(beta, b, sigma, Sigma)``.

:func:`score` turns a predictive into scores: per unit the joint log predictive density of its
held-out rows, ``log sum_s w_us prod_i p(y_i | eta_si)``; per row the predictive CDF ``F(y)``, for
counts also ``F(y - 1)`` and the randomised PIT ``F(y - 1) + V (F(y) - F(y - 1))`` (Czado,
Gneiting and Held 2009); for 0/1 rows the predicted probability (Brier score).  The summaries and
interval coverages are :class:`hiermeta.predictive.PredictiveScores`'s (one scorer per family).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
from scipy import stats
from scipy.special import logsumexp

from .family import get_family
from .terms import covariances, relative_factors

__all__ = ["HeldOut", "heldout_rows", "Predictive", "PosteriorState", "posterior_state", "plug_in",
           "eb_laplace", "eb_importance", "eb_quadrature", "eb_gaussian_exact", "nuts_predictive", "score",
           "Scores", "importance_log_likelihood", "solve_A"]


class HeldOut(NamedTuple):
    """Held-out rows evaluated as the fitted model's design.

    ``X`` ``(m, p)``, ``offset``; per term ``codes`` (``-1``: a level the fit has not seen) and ``Z``;
    ``new_codes`` per term (``-1`` for a seen level, else ``0..N_k - 1`` over the unseen levels);
    ``y``, ``w`` (binomial: proportion and trials); ``units`` ``(m,)`` in ``0..U - 1`` and
    ``unit_names``; ``unit_by``: what a unit is (a grouping factor's name, or ``"row"``).
    """

    X: np.ndarray
    offset: np.ndarray
    codes: list
    Z: list
    new_codes: list
    y: np.ndarray
    w: np.ndarray
    units: np.ndarray
    unit_names: tuple
    unit_by: str

    @property
    def num_rows(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_units(self) -> int:
        return len(self.unit_names)


def _keys(df, columns) -> list:
    if len(columns) == 1:
        return [str(v) for v in df[columns[0]].to_numpy()]
    return [":".join(str(v) for v in row) for row in df[list(columns)].itertuples(index=False)]


def heldout_rows(fit, data, unit_term: Optional[int] = 0) -> HeldOut:
    """``data`` (a data frame with the model's columns and response) as :class:`HeldOut` rows of ``fit``
    (a :class:`~hiermeta.mixed.result.MixedFit`); units: the levels of term ``unit_term``'s grouping
    factor, or every row its own unit (``None``)."""
    from .formula import model_frame

    frame = fit.model.frame
    new = frame.new_data(data, frame.design.terms)
    keep = [frame.design.fixed_names.index(n) for n in fit.design.fixed_names]
    own = model_frame(fit.model.formula, data, fit.model.family, fit.model.weights)
    y, w = np.asarray(own.design.response, dtype=float), np.asarray(own.design.weights, dtype=float)
    new_codes = []
    for k, codes in enumerate(new.codes):
        keys = np.asarray(_keys(data, frame.term_columns(k)), dtype=object)
        unseen = codes < 0
        nc = np.full(codes.shape, -1, dtype=np.int64)
        if unseen.any():
            _, nc[unseen] = np.unique(keys[unseen], return_inverse=True)
        new_codes.append(nc)
    if unit_term is None:
        units, names, by = np.arange(y.size), tuple(str(i) for i in range(y.size)), "row"
    else:
        keys = _keys(data, frame.term_columns(unit_term))
        names, units = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
        names, by = tuple(str(n) for n in names), fit.design.terms[unit_term].group
    return HeldOut(new.X[:, keep], np.asarray(new.offset, dtype=float), [np.asarray(c) for c in new.codes],
                   [np.asarray(z, dtype=float) for z in new.Z], new_codes, y, w, np.asarray(units), names, by)


class Predictive(NamedTuple):
    """A mixture predictive of the held-out rows: ``eta`` ``(S, m)``, ``log_weights`` ``(U, S)``
    (unnormalised; None: equal), ``scale`` ``(S,)`` residual sds (Gaussian) or None; ``method``
    and ``note`` say what it is; ``diagnostics`` (e.g. an importance sampler's effective sample size)."""

    method: str
    eta: np.ndarray
    log_weights: Optional[np.ndarray]
    scale: Optional[np.ndarray]
    note: str = ""
    diagnostics: dict = {}


# ---------------------------------------------------------------------------- the fit's posterior state


class PosteriorState(NamedTuple):
    """The conditional mode of a fit and its PLS factor (standardised scale; the EB posterior of ``u``
    is ``N(u, scale2 A^-1)``; ``glmm`` the GLMM criterion object, None for a Gaussian fit)."""

    layout: object
    factor: object
    u: np.ndarray
    factors: list  # T_k on the standardised scale
    scaling: object
    scale2: float
    glmm: object
    family: object
    theta_s: np.ndarray
    beta_s: np.ndarray


def posterior_state(fit) -> PosteriorState:
    """The fit's conditional mode and PLS factor at its estimates (Gaussian: the LMM's PLS system)."""
    est, design = fit.estimate, fit.design
    family = fit.model.family_spec
    if family.has_scale:
        from .lmm import ProfiledDeviance

        crit = ProfiledDeviance(design, reml=est.method == "REML")
        theta_s = crit.scaling.theta_s(est.theta)
        f = crit.factor(theta_s)
        return PosteriorState(crit.layout, f, f.u, relative_factors(crit.layout.terms, theta_s), crit.scaling,
                              float(est.sigma) ** 2, None, family, theta_s, crit.scaling.beta_s(est.beta))
    from .glmm import GLMM

    glmm = GLMM(design, family)
    theta_s, beta_s = glmm.scaling.theta_s(est.theta), glmm.scaling.beta_s(est.beta)
    mode = glmm.pirls(theta_s, beta_s)
    return PosteriorState(glmm.layout, mode.factor, mode.u, relative_factors(glmm.terms, theta_s), glmm.scaling,
                          1.0, glmm, family, theta_s, beta_s)


def solve_A(state: PosteriorState, R: np.ndarray) -> np.ndarray:
    """``A^-1 R`` for ``R`` ``(Q, m)`` (internal order) through the blocked factor."""
    f, lay = state.factor, state.layout
    L, q = lay.num_lead_levels, lay.q_lead
    R = np.asarray(R, dtype=float).reshape(lay.size, -1)
    m = R.shape[1]
    c_B = np.einsum("lij,ljm->lim", f.lead_inv, R[: lay.size_lead].reshape(L, q, m)).reshape(-1, m)
    if lay.rest:
        x_R = f.rest_solve(R[lay.size_lead:] - np.asarray(f.F.T @ c_B))
        c_B = c_B - np.asarray(f.F @ x_R)
    else:
        x_R = np.zeros((0, m))
    x_B = np.einsum("lji,ljm->lim", f.lead_inv, c_B.reshape(L, q, m)).reshape(-1, m)
    return np.concatenate([x_B, x_R])


def _gaussian_draws(state: PosteriorState, eps: np.ndarray) -> np.ndarray:
    """``x = L^-T e`` for ``e`` ``(S, Q)``: draws of ``N(0, A^-1)`` (module docstring)."""
    f, lay = state.factor, state.layout
    L, q = lay.num_lead_levels, lay.q_lead
    eps = np.atleast_2d(eps)
    S = eps.shape[0]
    if lay.rest:
        C = np.linalg.cholesky(0.5 * (f.rest_inverse() + f.rest_inverse().T))
        x_R = eps[:, lay.size_lead:] @ C.T
        resid = eps[:, : lay.size_lead] - np.asarray(f.F @ x_R.T).T
    else:
        x_R = np.zeros((S, 0))
        resid = eps[:, : lay.size_lead]
    x_B = np.einsum("lji,slj->sli", f.lead_inv, resid.reshape(S, L, q)).reshape(S, -1)
    return np.concatenate([x_B, x_R], axis=1)


def _effects(state: PosteriorState, u: np.ndarray) -> list:
    """Per term ``(S, L_k, q_k)`` effects ``b = Lambda u`` on the original scale from draws of ``u`` ``(S, Q)``."""
    lay = state.layout
    out = []
    for k, t in enumerate(lay.terms):
        if k == lay.lead:
            block = u[:, : lay.size_lead]
        else:
            o = lay.size_lead + lay.rest_offsets[k]
            block = u[:, o: o + t.num_levels * t.num_columns]
        b_s = block.reshape(u.shape[0], t.num_levels, t.num_columns) @ state.factors[k].T
        out.append(b_s / state.scaling.column_scales[k])
    return out


def _linear_predictor(held: HeldOut, beta: np.ndarray, effects: list, new_effects: list) -> np.ndarray:
    """``(S, m)`` linear predictors from draws of ``beta`` ``(S, p)``, per-term effects ``(S, L_k, q_k)``
    of the fitted levels and ``(S, N_k, q_k)`` of the unseen ones."""
    eta = np.atleast_2d(beta) @ held.X.T + held.offset
    for codes, new, Z, b, b_new in zip(held.codes, held.new_codes, held.Z, effects, new_effects):
        seen = codes >= 0
        if seen.any():
            eta[:, seen] += np.einsum("mq,smq->sm", Z[seen], b[:, codes[seen]])
        if (~seen).any():
            eta[:, ~seen] += np.einsum("mq,smq->sm", Z[~seen], b_new[:, new[~seen]])
    return eta


def _unseen_effects(held: HeldOut, covs: list, S: int, rng) -> list:
    """Per term ``(S, N_k, q_k)`` draws of the unseen levels' effects from ``N(0, Sigma_k)``
    (``covs``: per term ``(q, q)`` or per draw ``(S, q, q)``)."""
    out = []
    for new, S_k in zip(held.new_codes, covs):
        N = int(new.max()) + 1 if new.size and new.max() >= 0 else 0
        S_k = np.asarray(S_k)
        q = S_k.shape[-1]
        z = rng.standard_normal((S, N, q))
        chol = np.linalg.cholesky(S_k + 1e-12 * np.eye(q)) if S_k.ndim == 2 else \
            np.linalg.cholesky(S_k + 1e-12 * np.eye(q)[None])
        out.append(np.einsum("ij,snj->sni", chol, z) if chol.ndim == 2 else np.einsum("sij,snj->sni", chol, z))
    return out


def _fit_covariances(fit) -> list:
    est = fit.estimate
    return covariances(fit.design.terms, est.theta, 1.0 if est.sigma is None else float(est.sigma))


# ---------------------------------------------------------------------------- the methods


def plug_in(fit, held: HeldOut) -> Predictive:
    """(a) The MAP plug-in: the fit's fixed effects and conditional modes (unseen levels at 0)."""
    est = fit.estimate
    b = [np.asarray(bk)[None] for bk in est.b]
    zero = [np.zeros((1, int(max(nc.max(), -1)) + 1, bk.shape[-1])) for nc, bk in zip(held.new_codes, est.b)]
    eta = _linear_predictor(held, np.asarray(est.beta)[None], b, zero)
    scale = None if est.sigma is None else np.array([float(est.sigma)])
    return Predictive("MAP plug-in", eta, None, scale, "the fit's beta and conditional modes b_hat")


def eb_laplace(fit, held: HeldOut, num_draws: int = 2000, seed: int = 0, state: Optional[PosteriorState] = None,
               inflate: float = 1.0, method: str = "EB posterior (Laplace)") -> tuple:
    """(b) Draws of the EB posterior's Gaussian approximation ``N(u*, inflate^2 A^-1)``.

    Returns ``(Predictive, u draws (S, Q), eps (S, Q))``."""
    rng = np.random.default_rng(seed)
    state = posterior_state(fit) if state is None else state
    eps = rng.standard_normal((num_draws, state.layout.size))
    u = state.u[None] + inflate * np.sqrt(state.scale2) * _gaussian_draws(state, eps)
    effects = _effects(state, u)
    new = _unseen_effects(held, _fit_covariances(fit), num_draws, rng)
    beta = np.broadcast_to(np.asarray(fit.estimate.beta), (num_draws, held.X.shape[1]))
    eta = _linear_predictor(held, beta, effects, new)
    sigma = fit.estimate.sigma
    scale = None if sigma is None else np.full(num_draws, float(sigma))
    note = "exact for a Gaussian model" if sigma is not None else "Laplace (Gaussian) approximation at the mode"
    return Predictive(method, eta, None, scale, note), u, eps


def _log_importance_weights(state: PosteriorState, u: np.ndarray, eps: np.ndarray, inflate: float) -> np.ndarray:
    """``log p(y | u) + log N(u; 0, I) - log q(u)`` per draw (``q = N(u*, inflate^2 A^-1)``; every constant
    kept): ``(S,)``, or ``(S, L)`` per level when the model has one term (then ``A``, the prior and the
    likelihood all factor by level, and so do the weights)."""
    glmm, lay = state.glmm, state.layout
    fixed = glmm.offset + glmm.X @ state.beta_s
    per_level = len(lay.terms) == 1
    term = lay.terms[0]
    L, q = lay.num_lead_levels, lay.q_lead
    out = np.empty((u.shape[0], L)) if per_level else np.empty(u.shape[0])
    for s in range(u.shape[0]):
        eta = fixed + glmm.random_predictor(state.factors, u[s])
        ll = glmm.family.log_likelihood(glmm.y, glmm.family.inverse_link(eta), glmm.w)
        out[s] = np.bincount(term.codes, weights=ll, minlength=L) if per_level else np.sum(ll)
    if per_level:
        log_det = -2.0 * np.sum(np.log(np.abs(np.diagonal(state.factor.lead_inv, axis1=1, axis2=2))), axis=1)
        return (out - 0.5 * np.sum(u.reshape(-1, L, q) ** 2, axis=2) + 0.5 * np.sum(eps.reshape(-1, L, q) ** 2, axis=2)
                + q * np.log(inflate) - 0.5 * log_det[None, :])
    Q = u.shape[1]
    return (out - 0.5 * np.sum(u**2, axis=1) + 0.5 * np.sum(eps**2, axis=1) + Q * np.log(inflate)
            - 0.5 * state.factor.log_det_A)


def eb_importance(fit, held: HeldOut, num_draws: int = 2000, seed: int = 0, inflate: float = 1.2,
                  state: Optional[PosteriorState] = None) -> Predictive:
    """(b) The EB posterior by importance sampling on the widened Laplace proposal (module docstring)."""
    state = posterior_state(fit) if state is None else state
    if state.glmm is None:
        raise ValueError("importance sampling is for GLMMs; the Gaussian EB posterior is exact")
    pred, u, eps = eb_laplace(fit, held, num_draws, seed, state, inflate, "EB posterior (importance sampling)")
    log_w = _log_importance_weights(state, u, eps, inflate)
    if log_w.ndim == 2:  # one term: each unit's weights are its level's (a unit must be one level)
        if held.unit_by != state.layout.terms[0].group:
            log_w = np.sum(log_w, axis=1)
        else:
            unit_level = np.array([held.codes[0][held.units == k][0] for k in range(held.num_units)])
            lw = np.where(unit_level[:, None] >= 0, log_w.T[np.maximum(unit_level, 0)], 0.0)
            ess = _ess(log_w.T)
            return pred._replace(log_weights=lw, note=f"self-normalised importance sampling per level, proposal "
                                 f"N(u*, {inflate}^2 A^-1); effective sample size per level: median {np.median(ess):.0f}, "
                                 f"smallest {ess.min():.0f} of {num_draws}",
                                 diagnostics={"ess": float(ess.min()), "num_draws": num_draws, "inflate": inflate})
    ess = float(_ess(log_w[None])[0])
    lw = np.broadcast_to(log_w, (held.num_units, num_draws))
    return pred._replace(log_weights=lw, note=f"self-normalised importance sampling, proposal N(u*, {inflate}^2 A^-1) "
                                              f"over every effect jointly; effective sample size {ess:.0f} of {num_draws}",
                         diagnostics={"ess": ess, "num_draws": num_draws, "inflate": inflate})


def _ess(log_w: np.ndarray) -> np.ndarray:
    """Kish's effective sample size of each row of log-weights ``(R, S)``."""
    w = np.exp(log_w - logsumexp(log_w, axis=1, keepdims=True))
    return 1.0 / np.sum(w**2, axis=1)


def importance_log_likelihood(fit, num_draws: int = 2000, seed: int = 0, inflate: float = 1.2) -> dict:
    """``log p(y | beta_hat, theta_hat)`` by importance sampling on the widened Laplace proposal, with its
    Monte Carlo standard error (delta method), beside the Laplace value."""
    state = posterior_state(fit)
    if state.glmm is None:
        raise ValueError("the Gaussian marginal likelihood is exact")
    rng = np.random.default_rng(seed)
    eps = rng.standard_normal((num_draws, state.layout.size))
    u = state.u[None] + inflate * _gaussian_draws(state, eps)
    log_w = _log_importance_weights(state, u, eps, inflate)
    log_w = log_w.T if log_w.ndim == 2 else log_w[None]  # (levels or 1, S): independent factors
    per = logsumexp(log_w, axis=1) - np.log(num_draws)
    w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
    rel_se = np.std(w, axis=1, ddof=1) / np.sqrt(num_draws) / np.mean(w, axis=1)  # delta method, per factor
    laplace = float(-0.5 * state.glmm.laplace_deviance(state.theta_s, state.beta_s))
    return {"importance": float(np.sum(per)), "importance_se": float(np.sqrt(np.sum(rel_se**2))), "laplace": laplace,
            "ess": float(_ess(log_w).min()), "num_draws": num_draws, "per_level": bool(log_w.shape[0] > 1)}


def eb_quadrature(fit, held: HeldOut, num_nodes: int = 25, state: Optional[PosteriorState] = None) -> Predictive:
    """(b) The EB posterior of a single scalar random effect by adaptive Gauss-Hermite quadrature, per level;
    units must be that term's levels."""
    state = posterior_state(fit) if state is None else state
    glmm = state.glmm
    if glmm is None or len(glmm.terms) != 1 or glmm.terms[0].num_columns != 1:
        raise ValueError("quadrature needs a GLMM with one scalar random-effect term")
    if held.unit_by != glmm.terms[0].group:
        raise ValueError(f"quadrature scores units by the term's levels ({glmm.terms[0].group}), not {held.unit_by}")
    term = glmm.terms[0]
    T = float(state.factors[0][0, 0])
    s = state.factor.lead_inv[:, 0, 0]
    u_mode = state.u
    nodes, weights = np.polynomial.hermite_e.hermegauss(num_nodes)
    fixed = glmm.offset + glmm.X @ state.beta_s
    L = term.num_levels
    log_w = np.empty((L, num_nodes))
    u_nodes = u_mode[:, None] + s[:, None] * nodes[None, :]  # (L, K)
    for k in range(num_nodes):
        eta = fixed + term.Z[:, 0] * T * u_nodes[term.codes, k]
        ll = glmm.family.log_likelihood(glmm.y, glmm.family.inverse_link(eta), glmm.w)
        log_w[:, k] = (np.log(weights[k]) + 0.5 * nodes[k] ** 2 + np.bincount(term.codes, weights=ll, minlength=L)
                       - 0.5 * u_nodes[:, k] ** 2)
    # draws k: every fitted level at its node k; unseen levels at the prior's node k
    scale0 = state.scaling.column_scales[0][0]
    b_nodes = (T * u_nodes / scale0).T[:, :, None]  # (K, L, 1) original scale
    b_new = np.broadcast_to((T * nodes / scale0)[:, None, None], (num_nodes, int(max(held.new_codes[0].max(), -1)) + 1, 1))
    beta = np.broadcast_to(np.asarray(fit.estimate.beta), (num_nodes, held.X.shape[1]))
    eta = _linear_predictor(held, beta, [b_nodes], [b_new])
    # a unit's weights: its level's node weights (unseen level: the prior's Gauss-Hermite weights)
    unit_log_w = np.empty((held.num_units, num_nodes))
    for unit in range(held.num_units):
        rows = held.units == unit
        code = held.codes[0][rows][0]
        unit_log_w[unit] = log_w[code] if code >= 0 else np.log(weights)
    return Predictive("EB posterior (quadrature)", eta, unit_log_w, None,
                      f"adaptive Gauss-Hermite quadrature, {num_nodes} nodes per level")


def eb_gaussian_exact(fit, held: HeldOut, state: Optional[PosteriorState] = None) -> tuple:
    """(b) for a Gaussian model: per unit the mean ``(m_u,)`` and covariance ``(m_u, m_u)`` of the exact
    EB predictive of its held-out rows (module docstring).  Returns ``(mean (m,), [cov per unit])``."""
    state = posterior_state(fit) if state is None else state
    est = fit.estimate
    lay = state.layout
    sigma2 = float(est.sigma) ** 2
    mean = plug_in(fit, held).eta[0]
    covs_prior = _fit_covariances(fit)
    starts = {lay.lead: 0}
    starts.update({k: lay.size_lead + o for k, o in lay.rest_offsets.items()})
    out = []
    for unit in range(held.num_units):
        rows = np.flatnonzero(held.units == unit)
        # the coefficients (internal u order) of the seen levels the unit's rows touch, and their Z columns
        cols, design = [], []
        V = np.diag(sigma2 / held.w[rows])
        for k, t in enumerate(lay.terms):
            q = t.num_columns
            codes = held.codes[k][rows]
            d = state.scaling.column_scales[k]
            for level in np.unique(codes[codes >= 0]):
                idx = starts[k] + level * q + np.arange(q)
                cols.append(idx)
                Zl = np.where((codes == level)[:, None], held.Z[k][rows], 0.0) / d  # standardised columns
                design.append(Zl @ state.factors[k])  # V = Z_s T_s: the rows' loadings on u
            new = held.new_codes[k][rows]
            for level in np.unique(new[new >= 0]):
                Zl = np.where((new == level)[:, None], held.Z[k][rows], 0.0)
                V = V + Zl @ covs_prior[k] @ Zl.T
        if cols:
            J = np.concatenate(cols)
            E = np.zeros((lay.size, J.size))
            E[J, np.arange(J.size)] = 1.0
            AinvJ = solve_A(state, E)[J]  # (A^-1)_JJ
            G = np.concatenate(design, axis=1)
            V = V + state.scale2 * G @ AinvJ @ G.T
        out.append(V)
    return mean, out


def nuts_predictive(fit, held: HeldOut, nuts, seed: int = 0) -> Predictive:
    """(c) The NUTS draws (:func:`hiermeta.mixed.numpyro_model.mixed_nuts`) as a predictive."""
    rng = np.random.default_rng(seed)
    beta = nuts.flat("beta")
    S = beta.shape[0]
    effects = [nuts.flat("b", k) for k in range(len(nuts.b))]
    new = _unseen_effects(held, [nuts.covariance(k) for k in range(len(nuts.b))], S, rng)
    eta = _linear_predictor(held, beta, effects, new)
    scale = None if nuts.sigma is None else nuts.flat("sigma")
    return Predictive("NUTS", eta, None, scale, f"{S} posterior draws")


# ---------------------------------------------------------------------------- scores


class Scores(NamedTuple):
    """Per unit ``log_pred`` ``(U,)`` and ``num_obs``; per row ``pit``, ``cdf_below``, ``cdf_at``,
    ``p_one`` (binary rows: the predicted probability of a 1; else None)."""

    log_pred: np.ndarray
    num_obs: np.ndarray
    pit: np.ndarray
    cdf_below: Optional[np.ndarray]
    cdf_at: Optional[np.ndarray]
    p_one: Optional[np.ndarray]


def _unit_matrix(held: HeldOut) -> np.ndarray:
    M = np.zeros((held.num_rows, held.num_units))
    M[np.arange(held.num_rows), held.units] = 1.0
    return M


def score(family, held: HeldOut, pred: Predictive, seed: int = 0) -> Scores:
    """The scores of a mixture predictive (module docstring).  Non-finite draws or weights get weight 0;
    a unit with no finite draw scores NaN (never 0)."""
    fam = get_family(family)
    rng = np.random.default_rng(seed)
    S = pred.eta.shape[0]
    lw = np.zeros((held.num_units, S)) if pred.log_weights is None else np.array(pred.log_weights, dtype=float)
    finite = np.all(np.isfinite(pred.eta), axis=1)
    if pred.scale is not None:
        finite &= np.isfinite(pred.scale) & (np.asarray(pred.scale) > 0)
    lw = np.where(np.isfinite(lw) & finite[None, :], lw, -np.inf)
    empty = ~np.isfinite(lw).any(axis=1)
    lw = np.where(empty[:, None], 0.0, lw)
    lw = lw - logsumexp(lw, axis=1, keepdims=True)
    eta = np.where(finite[:, None], pred.eta, 0.0)
    mu = fam.inverse_link(eta)
    scale = None if pred.scale is None else np.where(finite, pred.scale, 1.0)[:, None]
    ll = fam.log_likelihood(held.y[None], mu, held.w[None], scale)  # (S, m)
    unit_ll = ll @ _unit_matrix(held)  # (S, U)
    log_pred = logsumexp(lw + unit_ll.T, axis=1)
    log_pred[empty] = np.nan
    row_w = np.exp(lw[held.units])  # (m, S)
    k = fam.counts(held.y, held.w)
    at = np.einsum("ms,sm->m", row_w, fam.cdf(k[None], mu, held.w[None], scale))
    if fam.discrete:
        below = np.einsum("ms,sm->m", row_w, fam.cdf(k[None] - 1.0, mu, held.w[None], scale))
        pit = below + rng.uniform(size=at.shape) * (at - below)
    else:
        below, pit = None, at
    p_one = np.einsum("ms,sm->m", row_w, mu) if fam.is_binary(held.w) else None
    bad = empty[held.units]
    pit = np.where(bad, np.nan, pit)
    at = np.where(bad, np.nan, at)
    below = None if below is None else np.where(bad, np.nan, below)
    p_one = None if p_one is None else np.where(bad, np.nan, p_one)
    return Scores(log_pred, np.bincount(held.units, minlength=held.num_units), pit, below,
                  at if fam.discrete else None, p_one)


def score_gaussian_exact(held: HeldOut, mean: np.ndarray, covs: list) -> Scores:
    """The scores of the exact Gaussian EB predictive (:func:`eb_gaussian_exact`)."""
    log_pred = np.empty(held.num_units)
    pit = np.empty(held.num_rows)
    for unit, V in enumerate(covs):
        rows = np.flatnonzero(held.units == unit)
        log_pred[unit] = stats.multivariate_normal(mean[rows], V).logpdf(held.y[rows])
        pit[rows] = stats.norm.cdf(held.y[rows], mean[rows], np.sqrt(np.diag(V)))
    return Scores(log_pred, np.bincount(held.units, minlength=held.num_units), pit, None, None, None)
