"""Eight schools (Rubin 1981) as a linear-Gaussian hierarchical model, with exact answers.

    mu ~ N(0, 5^2),  tau ~ HalfCauchy(5),  theta_j ~ N(mu, tau^2),  y_j ~ N(theta_j, s_j^2)  (s_j known)

In hiermeta's terms: 8 tasks with one scalar observation each, P = M = 1, phi = mu, sigma = tau;
the data are ``hiermeta.models.linear.make_data(y[:, None, None], np.ones((1, 1)), s[:, None, None])``.

Exact posterior: theta integrates out analytically (y_j | mu, tau ~ N(mu, tau^2 + s_j^2)) and so
does mu given tau (a normal prior and normal likelihood), leaving a one-dimensional integral over
tau.  With u = arctan(tau / 5) the half-Cauchy prior is uniform on (0, pi/2), so every posterior
moment is a ratio of integrals of smooth functions over a bounded interval (adaptive quadrature).

Empirical Bayes: type-II maximum likelihood maximises sum_j log N(y_j | mu, tau^2 + s_j^2); the
predictive-likelihood (PLL) estimate needs a support/query split of each school's single
observation, made by Gaussian data fission: with z_j ~ N(0, s_j^2), f_j = y_j + z_j and
g_j = y_j - z_j are independent N(theta_j, 2 s_j^2) (support f, query g), and the PLL is taken in
expectation over z, which is closed form (:func:`fission_pll`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import integrate, optimize

from hiermeta import GaussianData, TaskBatch

from . import linear

__all__ = [
    "Y",
    "SE",
    "SCHOOLS",
    "make_data",
    "make_model",
    "ExactPosterior",
    "exact_posterior",
    "log_evidence_given_tau",
    "profile_log_marginal",
    "type2_ml",
    "fission_pll",
    "fission_pll_gradients",
    "fission_batch",
    "pll_estimate",
]

Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SE = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
SCHOOLS = ["A", "B", "C", "D", "E", "F", "G", "H"]


def make_data(y=Y, se=SE) -> GaussianData:
    """The schools as 8 tasks of one observation each (``T = 8, N = 1, D = 1``)."""
    y, se = np.asarray(y, float), np.asarray(se, float)
    if y.shape != se.shape or y.ndim != 1:
        raise ValueError(f"y and se must be vectors of equal length, got {y.shape} and {se.shape}")
    return linear.make_data(y[:, None, None], np.ones((1, 1)), se[:, None, None])


def make_model(mu_scale: float = 5.0, tau_scale: float = 5.0, tau_prior: str = "half_cauchy"):
    """Eq. 1 with P = M = 1 and the priors mu ~ N(0, mu_scale^2), tau ~ HalfCauchy(tau_scale)."""
    from hiermeta.posterior import with_priors

    return with_priors(linear.make_model(1), phi_loc=0.0, phi_scale=mu_scale, sigma=tau_prior, sigma_scale=tau_scale)


def log_evidence_given_tau(tau, y=Y, se=SE, mu_scale=5.0):
    """``log p(y | tau)`` with mu ~ N(0, mu_scale^2) and theta integrated out; also returns mu | tau, y.

    Returns ``(log_evidence, m(tau), v(tau))``: precision 1/v = 1/mu_scale^2 + sum_j 1/V_j,
    m = v sum_j y_j / V_j, V_j = tau^2 + s_j^2.
    """
    V = float(tau) ** 2 + se**2
    prec = 1.0 / mu_scale**2 + np.sum(1.0 / V)
    m = np.sum(y / V) / prec
    log_ev = (
        -0.5 * (np.sum(y**2 / V) - prec * m**2)
        - 0.5 * np.sum(np.log(2 * np.pi * V))
        - 0.5 * np.log(mu_scale**2 * prec)
    )
    return log_ev, m, 1.0 / prec


class ExactPosterior(NamedTuple):
    """Posterior means and sds by quadrature: mu, tau and the school effects theta_j ``(8,)``."""

    mu_mean: float
    mu_sd: float
    tau_mean: float
    tau_sd: float
    theta_mean: np.ndarray
    theta_sd: np.ndarray
    tau_median: float


def exact_posterior(y=Y, se=SE, mu_scale=5.0, tau_scale=5.0) -> ExactPosterior:
    """The exact posterior of (mu, tau, theta) under mu ~ N(0, mu_scale^2), tau ~ HalfCauchy(tau_scale).

    Given tau: mu ~ N(m, v) and theta_j | mu, tau ~ N(w_j y_j + (1 - w_j) mu, w_j s_j^2),
    w_j = tau^2 / (tau^2 + s_j^2); so E[theta_j | tau] = w_j y_j + (1 - w_j) m and
    Var[theta_j | tau] = w_j s_j^2 + (1 - w_j)^2 v.  Then integrate over u = arctan(tau / tau_scale)
    (uniform prior), weighting by p(y | tau).
    """
    y, se = np.asarray(y, float), np.asarray(se, float)
    ref, _, _ = log_evidence_given_tau(0.0, y, se, mu_scale)

    def moments(u):
        tau = tau_scale * np.tan(u)
        log_ev, m, v = log_evidence_given_tau(tau, y, se, mu_scale)
        w = tau**2 / (tau**2 + se**2)
        th_m = w * y + (1 - w) * m
        th_v = w * se**2 + (1 - w) ** 2 * v
        dens = np.exp(log_ev - ref)
        return dens, np.concatenate([[1.0, m, v + m**2, tau, tau**2], th_m, th_v + th_m**2]) * dens

    K = 5 + 2 * len(y)
    vals = np.array([
        integrate.quad(lambda u, k=k: moments(u)[1][k], 0.0, np.pi / 2, epsabs=0, epsrel=1e-11, limit=400)[0]
        for k in range(K)
    ])
    vals = vals / vals[0]
    n = len(y)
    mu_mean, mu_sd = vals[1], np.sqrt(vals[2] - vals[1] ** 2)
    tau_mean, tau_sd = vals[3], np.sqrt(vals[4] - vals[3] ** 2)
    th_mean = vals[5:5 + n]
    th_sd = np.sqrt(vals[5 + n:] - th_mean**2)
    # median of tau: solve P(tau <= t) = 1/2 on the u scale
    dens = lambda u: moments(u)[0]
    total = integrate.quad(dens, 0.0, np.pi / 2, epsabs=0, epsrel=1e-11, limit=400)[0]
    cdf = lambda u: integrate.quad(dens, 0.0, u, epsabs=0, epsrel=1e-11, limit=400)[0] / total - 0.5
    u_med = optimize.brentq(cdf, 1e-9, np.pi / 2 - 1e-9, xtol=1e-12)
    return ExactPosterior(mu_mean, mu_sd, tau_mean, tau_sd, th_mean, th_sd, tau_scale * np.tan(u_med))


def profile_log_marginal(tau, y=Y, se=SE):
    """``max_mu sum_j log N(y_j | mu, tau^2 + s_j^2)``: returns ``(value, mu_hat(tau))``."""
    V = np.asarray(tau, float) ** 2 + se**2
    mu = np.sum(y / V) / np.sum(1.0 / V)
    return float(-0.5 * np.sum((y - mu) ** 2 / V + np.log(2 * np.pi * V))), float(mu)


def type2_ml(y=Y, se=SE, tau_max: float = 100.0, grid: int = 2001):
    """Type-II ML of (mu, tau) over tau in [0, tau_max] by profiling mu out.

    Returns ``dict(tau, mu, log_marginal, boundary, slope_at_zero)``: ``boundary`` is True when
    the maximum is at tau = 0, confirmed by ``slope_at_zero``, the derivative of the profile in
    tau^2 at 0 (not positive there and no larger value on the grid).
    """
    taus = np.linspace(0.0, tau_max, grid)
    prof = np.array([profile_log_marginal(t, y, se)[0] for t in taus])
    i = int(np.argmax(prof))
    if i == 0:
        tau = 0.0
    else:
        lo, hi = taus[max(i - 1, 0)], taus[min(i + 1, grid - 1)]
        tau = optimize.minimize_scalar(lambda t: -profile_log_marginal(t, y, se)[0], bounds=(lo, hi),
                                       method="bounded", options={"xatol": 1e-10}).x
    value, mu = profile_log_marginal(tau, y, se)
    eps = 1e-6  # d/d(tau^2) by a one-sided difference in tau^2
    slope = (profile_log_marginal(np.sqrt(eps), y, se)[0] - profile_log_marginal(0.0, y, se)[0]) / eps
    return {"tau": float(tau), "mu": mu, "log_marginal": value, "boundary": bool(i == 0 and slope <= 0),
            "slope_at_zero": float(slope)}


def fission_pll(mu, tau, y=Y, se=SE):
    """Expected PLL per school under Gaussian data fission (support y + z, query y - z, z ~ N(0, s^2)).

    The MAP from the support is theta_hat = w (y + z) + (1 - w) mu with w = tau^2 / (tau^2 + 2 s^2);
    the query residual is r = (1 - w)(y - mu) - (1 + w) z, so
    E_z log N(y - z | theta_hat, 2 s^2) = -1/2 log(4 pi s^2) - [(1 - w)^2 (y - mu)^2 + (1 + w)^2 s^2] / (4 s^2).
    """
    w = tau**2 / (tau**2 + 2 * se**2)
    second = (1 - w) ** 2 * (y - mu) ** 2 + (1 + w) ** 2 * se**2
    return -0.5 * np.log(4 * np.pi * se**2) - second / (4 * se**2)


def fission_pll_gradients(mu, tau, y=Y, se=SE):
    """Per school, the expected PLL gradient in rho = log tau^2: Eq. 4's and the exact one.

    Eq. 4: E[(theta_hat - mu) g] = w [(1 - w)(y - mu)^2 - (1 + w) s^2] / (2 s^2), g = (query - theta_hat)/(2 s^2);
    exact: (1 - w) times that (the 1-D factor 1 / (1 + tau^2 / (2 s^2))).
    """
    w = tau**2 / (tau**2 + 2 * se**2)
    eq4 = w * ((1 - w) * (y - mu) ** 2 - (1 + w) * se**2) / (2 * se**2)
    return eq4, (1 - w) * eq4


def _map_mu(tau, y, se):
    """phi's MAP rule of Algorithm 1 in expectation: sum_j w_j (y_j - mu) = 0."""
    w = 1.0 / (tau**2 + 2 * se**2) if tau > 0 else 1.0 / (2 * se**2)
    return float(np.sum(w * y) / np.sum(w))


def pll_estimate(y=Y, se=SE, tau_max: float = 100.0):
    """The PLL estimates of tau under fission: the maximiser of the expected PLL and Eq. 4's fixed point.

    mu follows Algorithm 1's MAP rule (the w-weighted mean).  Returns ``dict(pll_tau, pll_mu,
    pll_boundary, eq4_tau, eq4_boundary)``; a boundary estimate is reported as tau = 0 (or tau_max).
    """
    def total_pll(tau):
        return float(np.sum(fission_pll(_map_mu(tau, y, se), tau, y, se)))

    taus = np.concatenate([[0.0], np.geomspace(1e-3, tau_max, 4000)])
    vals = np.array([total_pll(t) for t in taus])
    i = int(np.argmax(vals))
    if 0 < i < len(taus) - 1:
        tau = optimize.minimize_scalar(lambda t: -total_pll(t), bounds=(taus[i - 1], taus[i + 1]),
                                       method="bounded", options={"xatol": 1e-10}).x
    else:
        tau = taus[i]
    eq4 = lambda t: float(np.sum(fission_pll_gradients(_map_mu(t, y, se), t, y, se)[0]))
    grads = np.array([eq4(t) for t in taus[1:]])
    sign_change = np.flatnonzero((grads[:-1] > 0) & (grads[1:] <= 0))
    if sign_change.size:
        j = int(sign_change[-1])
        eq4_tau = optimize.brentq(eq4, taus[1:][j], taus[1:][j + 1], xtol=1e-12)
    else:
        eq4_tau = 0.0 if grads[0] <= 0 else tau_max
    return {"pll_tau": float(tau), "pll_mu": _map_mu(tau, y, se), "pll_boundary": bool(i == 0),
            "eq4_tau": float(eq4_tau), "eq4_boundary": bool(eq4_tau in (0.0, tau_max))}


def fission_batch(key, copies: int, y=Y, se=SE) -> TaskBatch:
    """``copies`` independent fissions of every school: support y + z, query y - z (noise sd sqrt(2) s).

    Returns a TaskBatch of ``8 * copies`` tasks (copy-major); for Algorithm 1 on eight schools.
    """
    import jax
    import jax.numpy as jnp

    y_all, se_all = jnp.tile(jnp.asarray(y), copies), jnp.tile(jnp.asarray(se), copies)
    z = se_all * jax.random.normal(key, y_all.shape, y_all.dtype)
    T = y_all.shape[0]

    def split(obs):
        return GaussianData(obs=obs[:, None, None], noise_sd=(jnp.sqrt(2.0) * se_all)[:, None, None],
                            mask=jnp.ones((T, 1), bool), inputs=jnp.ones((T, 1, 1, 1), y_all.dtype))

    return TaskBatch(train=split(y_all + z), val=split(y_all - z))
