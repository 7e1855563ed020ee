"""A new task's predictive under three levels of approximation, and how to score it.

For a new task with support ``D^tr`` and query ``D^val``:

    (a) plug-in:      p(D^val | theta_hat),  theta_hat the MAP under empirical-Bayes (phi, sigma)
    (b) conditional:  int p(D^val | theta) p(theta | D^tr, phi_hat, sigma_hat) dtheta
    (c) full Bayes:   int p(D^val | theta) p(theta | D^tr, phi, sigma) p(phi, sigma | D^tr, D_train)

Every predictive here is a weighted mixture over draws of theta (``(T, S, P)`` with log-weights
``(T, S)``): (a) is one draw; (b) draws from the exact, Laplace or NUTS posterior of theta; (c)
draws theta per posterior draw (phi_s, sigma_s) of the training tasks' NUTS run, weighted by the
new support's evidence ``p(D^tr | phi_s, sigma_s)`` (so the hyperposterior is also updated by the
new task's own support: exact self-normalised importance sampling when that evidence is exact).

Scores, per held-out task: the joint log predictive density of its query data,
``log p(D^val_t | ...)`` (reported per query observation), for any task likelihood, and the
probability integral transform (PIT) of every query scalar, ``F(x)`` under the predictive; a
central interval of level ``q`` covers ``x`` iff ``|F(x) - 1/2| <= q/2``, so calibration is the
fraction covered.  For a discrete outcome ``F`` jumps, so the PIT is *randomised*,
``u = F(x - 1) + V (F(x) - F(x - 1))`` with ``V ~ U(0, 1)`` (uniform exactly when the predictive is
calibrated; Czado, Gneiting and Held 2009), and the central interval ``[l, u]`` of level ``q``
(``l`` the smallest count with ``F(l) >= (1 - q)/2``, ``u`` the smallest with ``F(u) >= (1 + q)/2``)
covers ``x`` iff ``F(x) >= (1 - q)/2`` and ``F(x - 1) < (1 + q)/2`` (at least ``q`` when calibrated).
For binary outcomes the Brier score ``(P(x = 1) - x)^2`` is reported too.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp, ndtr

from .hierarchy import HierarchicalModel
from .laplace import laplace
from .linear_gaussian import GaussianData, GaussianLikelihood
from .posterior import task_log_likelihood

__all__ = [
    "PredictiveScores",
    "mixture_pit",
    "score_draws",
    "score_gaussian_mixture",
    "gaussian_draws",
    "full_bayes_laplace_draws",
    "full_bayes_importance_draws",
    "coverage",
    "interval_coverage",
]


class PredictiveScores(NamedTuple):
    """``log_pred`` ``(T,)``: log p(D^val_t | ...) joint over the task's query data;
    ``pit`` ``(T, N, D)`` (Gaussian) or ``(T, N)`` (the GLM families): predictive CDF at every query
    scalar, randomised for discrete outcomes (NaN at padding; None when the likelihood has no CDF);
    ``num_obs`` ``(T,)``: query observations per task; for discrete outcomes ``cdf_below`` and
    ``cdf_at`` ``(T, N)``: the predictive ``F(x - 1)`` and ``F(x)`` (interval coverage); for binary
    outcomes ``brier`` ``(T, N)``: ``(P(x = 1) - x)^2`` (NaN at padding)."""

    log_pred: np.ndarray
    pit: Optional[np.ndarray]
    num_obs: np.ndarray
    cdf_below: Optional[np.ndarray] = None
    cdf_at: Optional[np.ndarray] = None
    brier: Optional[np.ndarray] = None

    def summary(self, levels: Sequence[float] = (0.5, 0.9)) -> dict:
        """Mean over tasks of log_pred / num_obs and its standard error; coverage per level (from the
        PIT); for discrete outcomes the coverage of the central predictive intervals; the mean Brier score."""
        per_obs = np.asarray(self.log_pred) / np.asarray(self.num_obs)
        T = per_obs.shape[0]
        out = {
            "lpd_per_obs": float(per_obs.mean()),
            "lpd_sem": float(per_obs.std(ddof=1) / np.sqrt(T)) if T > 1 else 0.0,
        }
        if self.pit is not None:
            out["coverage"] = {float(q): c for q, c in zip(levels, coverage(self.pit, levels))}
        if self.cdf_at is not None:
            out["interval_coverage"] = {float(q): c for q, c in zip(
                levels, interval_coverage(self.cdf_below, self.cdf_at, levels))}
        if self.brier is not None:
            b = np.asarray(self.brier, dtype=float)
            out["brier"] = float(np.nanmean(b))
        return out

    def per_obs(self) -> np.ndarray:
        return np.asarray(self.log_pred) / np.asarray(self.num_obs)


def interval_coverage(cdf_below, cdf_at, levels: Sequence[float]) -> list[float]:
    """Fraction of discrete observations inside the central predictive interval of each level:
    ``x`` is inside iff ``F(x) >= (1 - q)/2`` and ``F(x - 1) < (1 + q)/2`` (NaN entries are padding)."""
    lo, hi = np.asarray(cdf_below, dtype=float), np.asarray(cdf_at, dtype=float)
    keep = np.isfinite(lo) & np.isfinite(hi)
    if not keep.any():
        raise ValueError("no observations to score")
    lo, hi = lo[keep], hi[keep]
    return [float(np.mean((hi >= (1 - q) / 2) & (lo < (1 + q) / 2))) for q in levels]


def coverage(pit, levels: Sequence[float]) -> list[float]:
    """Fraction of (non-NaN) PIT values inside the central interval of each level."""
    pit = np.asarray(pit, dtype=float)
    pit = pit[np.isfinite(pit)]
    if pit.size == 0:
        raise ValueError("no PIT values to score")
    return [float(np.mean(np.abs(pit - 0.5) <= q / 2)) for q in levels]


def _normalise(log_weights, shape):
    lw = jnp.zeros(shape) if log_weights is None else jnp.asarray(log_weights)
    if lw.shape != shape:
        raise ValueError(f"log_weights must have shape {shape}, got {lw.shape}")
    return lw - logsumexp(lw, axis=-1, keepdims=True)


def mixture_pit(obs, mean, sd, log_weights=None, mask=None):
    """PIT of each scalar under a Gaussian mixture per task.

    ``obs`` ``(T, N, D)``; ``mean``, ``sd`` ``(T, K, N, D)`` components; ``log_weights`` ``(T, K)``
    (unnormalised; default equal).  Returns ``(T, N, D)``, NaN where ``mask`` ``(T, N)`` is False.
    """
    T, K = mean.shape[:2]
    lw = _normalise(log_weights, (T, K))

    def one(args):
        x, m, s, w = args
        return jnp.einsum("k,knd->nd", jnp.exp(w), ndtr((x[None] - m) / s))

    pit = jax.lax.map(one, (jnp.asarray(obs), mean, sd, lw), batch_size=16)
    if mask is not None:
        pit = jnp.where(jnp.asarray(mask)[..., None], pit, jnp.nan)
    return pit


def score_gaussian_mixture(log_pred_components, mean, sd, query: GaussianData, log_weights=None) -> PredictiveScores:
    """Scores when each mixture component's predictive is known in closed form.

    ``log_pred_components`` ``(T, K)``: log p(D^val_t | component k); ``mean``, ``sd``
    ``(T, K, N, D)``: the component's marginal predictive of each query scalar; ``log_weights``
    ``(T, K)`` unnormalised.  The joint log predictive is ``logsumexp_k(w_k + log_pred_k)``.
    """
    T, K = jnp.shape(log_pred_components)
    lw = _normalise(log_weights, (T, K))
    log_pred = logsumexp(lw + jnp.asarray(log_pred_components), axis=-1)
    pit = mixture_pit(query.obs, mean, sd, log_weights, query.mask)
    return PredictiveScores(np.asarray(log_pred), np.asarray(pit), np.asarray(jnp.sum(query.mask, -1)))


def _globals_per_draw(model: HierarchicalModel, extra: Optional[Mapping[str, Any]], S: int) -> dict:
    """The likelihood's global parameters as ``(S, ...)`` arrays: one value for every draw, or one per draw."""
    if not model.global_params:
        return {}
    g = model.globals_of(extra)
    out = {}
    for name, spec in model.global_params.items():
        value = jnp.asarray(g[name])
        shape = tuple(spec.shape)
        if value.shape == shape:
            value = jnp.broadcast_to(value, (S,) + shape)
        elif value.shape != (S,) + shape:
            raise ValueError(f"extra[{name!r}] must have shape {shape} (shared by the draws) or {(S,) + shape} "
                             f"(one per draw), got {value.shape}")
        out[name] = value
    return out


def score_draws(model: HierarchicalModel, draws, query, log_weights=None, extra=None, key=None) -> PredictiveScores:
    """Scores of the predictive ``sum_s w_ts p(. | theta_ts, g_s)`` from draws ``(T, S, P)``.

    ``log p(D^val_t | .) = logsumexp_s(log w_ts + log p(D^val_t | theta_ts, g_s))`` (normalised
    weights; draws or log-weights that are not finite get weight 0) for any task likelihood.
    ``extra``: the likelihood's global parameters (e.g. ``beta``, ``noise_sd``), each shared by the
    draws (its site's shape) or one per draw (``(S, ...)``, e.g. NUTS draws).  The PIT, per query
    scalar ``F(x) = sum_s w_ts F(x | theta_ts, g_s)``, needs the likelihood's predictive CDF: a
    :class:`~hiermeta.GaussianLikelihood` or a family of :mod:`hiermeta.families` (any likelihood
    with a ``cdf(theta, data, value, g)`` method and a ``discrete`` flag); for a discrete one it
    is randomised with ``key`` (default ``PRNGKey(0)``) and the interval bounds and, for a binary
    one (``binary``), the Brier score are returned too.  Without a CDF, ``pit`` is None.
    """
    draws = jnp.asarray(draws)
    if draws.ndim != 3 or draws.shape[-1] != model.partition.num_params:
        raise ValueError(f"draws must have shape (tasks, draws, {model.partition.num_params}), got {draws.shape}")
    T, S, _ = draws.shape
    model.likelihood.check(query, "query data")
    g = _globals_per_draw(model, extra, S)
    lw = jnp.zeros((T, S)) if log_weights is None else jnp.asarray(log_weights)
    # a draw that is not finite (e.g. from a failed approximation) gets weight 0
    ok = jnp.all(jnp.isfinite(draws), axis=-1) & jnp.isfinite(lw)
    for value in g.values():
        ok = ok & jnp.all(jnp.isfinite(value.reshape(S, -1)), axis=-1)[None, :]
    draws = jnp.where(ok[..., None], draws, 0.0)
    lw = _normalise(jnp.where(ok, lw, -jnp.inf), (T, S))
    log_lik = task_log_likelihood(model, jnp.swapaxes(draws, 0, 1), query, g or None).T  # (T, S)
    log_pred = logsumexp(lw + log_lik, axis=-1)
    lik = model.likelihood
    num_obs = np.asarray(lik.num_observations(query))
    unravel = jax.vmap(model.partition.unravel)
    per_draw = (jnp.swapaxes(draws, 0, 1), g)  # (S, T, P), {name: (S, ...)}
    if isinstance(lik, GaussianLikelihood):

        def moments(args):  # (T, P) -> (T, N, D)
            th_s, g_s = args
            return lik.mean(unravel(th_s), query, g_s), lik.sd(query, g_s)

        mu, sd = jax.lax.map(moments, per_draw, batch_size=64)  # (S, T, N, D)
        pit = mixture_pit(query.obs, jnp.swapaxes(mu, 0, 1), jnp.swapaxes(sd, 0, 1), lw, query.mask)
        return PredictiveScores(np.asarray(log_pred), np.asarray(pit), num_obs)
    if not callable(getattr(lik, "cdf", None)):
        return PredictiveScores(np.asarray(log_pred), None, num_obs)
    discrete, binary = bool(getattr(lik, "discrete", False)), bool(getattr(lik, "binary", False))
    y = jnp.asarray(query.response)
    weights = jnp.exp(lw)  # (T, S)

    def cdfs(args):  # one draw: F(y), F(y - 1), P(y = 1), each (T, N)
        th_s, g_s = args
        theta = unravel(th_s)
        at = lik.cdf(theta, query, y, g_s or None)
        below = lik.cdf(theta, query, y - 1.0, g_s or None) if discrete else at
        one = 1.0 - lik.cdf(theta, query, jnp.zeros_like(y), g_s or None) if binary else at
        return at, below, one

    at, below, one = jax.lax.map(cdfs, per_draw, batch_size=64)  # (S, T, N)
    mix = lambda f: jnp.einsum("ts,stn->tn", weights, f)
    at, below, p_one = mix(at), mix(below), mix(one)
    mask = jnp.asarray(query.mask)
    nan = lambda a: np.asarray(jnp.where(mask, a, jnp.nan))
    if not discrete:
        return PredictiveScores(np.asarray(log_pred), nan(at), num_obs)
    v = jax.random.uniform(jax.random.PRNGKey(0) if key is None else key, y.shape, dtype=at.dtype)
    pit = below + v * (at - below)
    brier = nan((p_one - y) ** 2) if binary else None
    return PredictiveScores(np.asarray(log_pred), nan(pit), num_obs, nan(below), nan(at), brier)


def gaussian_draws(key, mean, cov, num_draws: int):
    """``num_draws`` draws from ``N(mean_t, cov_t)`` per task: ``(T, P)``, ``(T, P, P)`` -> ``(T, S, P)``."""
    chol = jnp.linalg.cholesky(cov)
    z = jax.random.normal(key, (mean.shape[0], num_draws, mean.shape[-1]), mean.dtype)
    return mean[:, None, :] + jnp.einsum("tpq,tsq->tsp", chol, z)


def full_bayes_laplace_draws(
    model: HierarchicalModel,
    phi_draws,
    sigma_draws,
    support,
    key,
    *,
    draws_per_hyper: int = 4,
    num_steps: int = 500,
):
    """Level (c) for any domain: hyperposterior draws ``(H, P)``, ``(H, M)`` (e.g. from NUTS on the
    training tasks), a Laplace posterior of each new task's theta per draw, and the new support's
    Laplace evidence as importance weight.

    Returns ``(draws (T, H * R, P), log_weights (T, H * R), converged_fraction)`` for
    :func:`score_draws`, ``R = draws_per_hyper``.  Exact on a linear-Gaussian domain up to Monte
    Carlo error (the Laplace posterior and evidence are then exact).
    """
    phi_draws, sigma_draws = jnp.asarray(phi_draws), jnp.asarray(sigma_draws)
    H = phi_draws.shape[0]
    if sigma_draws.shape[0] != H:
        raise ValueError(f"{H} phi draws but {sigma_draws.shape[0]} sigma draws")

    def per_hyper(args):
        phi, sigma, k = args
        lap = laplace(model, phi, sigma, support, num_steps=num_steps)
        th = gaussian_draws(k, lap.mean, lap.cov, draws_per_hyper)  # (T, R, P)
        return th, lap.log_evidence, lap.converged

    keys = jax.random.split(key, H)
    th, log_ev, ok = jax.lax.map(per_hyper, (phi_draws, sigma_draws, keys))  # (H, T, R, P), (H, T)
    T, R, P = th.shape[1:]
    draws = jnp.transpose(th, (1, 0, 2, 3)).reshape(T, H * R, P)
    log_w = jnp.repeat(log_ev.T, R, axis=1)  # (T, H * R)
    return draws, log_w, float(jnp.mean(ok))


def full_bayes_importance_draws(
    model: HierarchicalModel,
    phi_draws,
    sigma_draws,
    support,
    key,
    *,
    draws_per_hyper: int = 8,
    inflate: float = 1.5,
    num_steps: int = 500,
):
    """Level (c) for any domain, consistent without the Laplace approximation.

    Per hyperposterior draw h and new task t, draw theta from the proposal
    ``q = N(theta_hat, inflate^2 H^-1)`` (the Laplace fit, widened) and weight it by

        w = N(theta | phi_h, sigma_h^2) p(D^tr_t | theta) / q(theta) = exp(-L_t(theta; phi_h, sigma_h)) / q(theta),

    whose mean over the draws is an unbiased estimate of the support's evidence
    ``p(D^tr_t | phi_h, sigma_h)``; self-normalised over all (h, r), the weighted draws target the full
    posterior of the new task's theta given the training tasks and its support.  Returns
    ``(draws (T, H * R, P), log_weights (T, H * R), ess (T,))`` with the weights' effective sample size.
    """
    phi_draws, sigma_draws = jnp.asarray(phi_draws), jnp.asarray(sigma_draws)
    H = phi_draws.shape[0]
    if sigma_draws.shape[0] != H:
        raise ValueError(f"{H} phi draws but {sigma_draws.shape[0]} sigma draws")
    if not inflate > 0:
        raise ValueError(f"inflate must be > 0, got {inflate}")

    def per_hyper(args):
        phi, sigma, k = args
        sigma = jnp.broadcast_to(sigma, (model.partition.num_modules,))
        lap = laplace(model, phi, sigma, support, num_steps=num_steps)
        cov = inflate**2 * lap.cov
        th = gaussian_draws(k, lap.mean, cov, draws_per_hyper)  # (T, R, P)
        chol = jnp.linalg.cholesky(cov)
        z = jax.scipy.linalg.solve_triangular(chol[:, None], (th - lap.mean[:, None])[..., None], lower=True)[..., 0]
        P = th.shape[-1]
        log_q = -0.5 * jnp.sum(z**2, -1) - jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)[:, None] \
            - 0.5 * P * jnp.log(2 * jnp.pi)
        neg_l = -jax.vmap(lambda th_t, d: jax.vmap(lambda t: model.inner_objective(t, phi, sigma, d))(th_t))(th, support)
        return th, neg_l - log_q

    keys = jax.random.split(key, H)
    th, log_w = jax.lax.map(per_hyper, (phi_draws, sigma_draws, keys))  # (H, T, R, P), (H, T, R)
    T, R, P = th.shape[1:]
    draws = jnp.transpose(th, (1, 0, 2, 3)).reshape(T, H * R, P)
    log_w = jnp.transpose(log_w, (1, 0, 2)).reshape(T, H * R)
    w = jax.nn.softmax(jnp.where(jnp.isfinite(log_w), log_w, -jnp.inf), axis=-1)
    return draws, log_w, 1.0 / jnp.sum(w**2, axis=-1)
