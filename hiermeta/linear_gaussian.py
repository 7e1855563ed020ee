"""Linear-Gaussian task likelihoods (linear mixed models) and their closed forms.

Observation n of task t (``D`` scalars), with designs ``Z_{t,n}`` ``(D, P)`` for the task
parameters, ``X_{t,n}`` ``(D, K)`` for unpooled fixed effects ``beta`` (a global parameter) and a
known offset:

    x_{t,n} ~ N(Z_{t,n} theta_t + X_{t,n} beta + offset_{t,n},  diag(sd_{t,n}^2))
    theta_t ~ N(m_t, Sigma)          (m_t = phi + z_t gamma; Sigma from sigma and the correlations)

Everything is Gaussian.  With W = diag(1 / sd^2) over the task's observed scalars,
r = x - Z m_t - X beta - offset, F = Z^T W Z, b = Z^T W r and Sigma = L L^T, B = I + L^T F L:

    log p(D_t | m_t, Sigma, beta, noise) = -1/2 [ r^T W r - c^T B^-1 c + log|B| + sum log sd^2 + n log 2 pi ],
                                                         c = L^T b
    theta_t | D_t ~ N(m_t + L B^-1 c,  L B^-1 L^T)          (the posterior; its mean is the MAP)

(the matrix determinant lemma and Woodbury written with L, so a singular Sigma — a sigma at 0 —
is handled exactly).  This is lme4's / statsmodels' linear mixed model with the random effects
``theta_t - m_t``.

Sufficient statistics.  None of F, b, r^T W r needs the observations once these sums are known
(:meth:`LinearGaussianLikelihood.sufficient_statistics`), with W0 the known part of the weights
(1 / known sd^2, or 1 / relative scale^2 when the noise sd s_g is learned; g the noise group of an
observed scalar: one group for a scalar noise sd, one per dimension for ``noise_shape=(D,)``) and
y = x - offset:

    Z^T W0 Z,  Z^T W0 X,  X^T W0 X,  Z^T W0 y,  X^T W0 y,  y^T W0 y,  n       per task and noise group

so that, with W = W0 / s_g^2 summed over groups and e = y - Z m_t - X beta = r,

    F = Z^T W Z,   b = Z^T W y - F m_t - Z^T W X beta,
    r^T W r = y^T W y - 2 m_t^T Z^T W y - 2 beta^T X^T W y + m_t^T F m_t + 2 m_t^T Z^T W X beta
              + beta^T X^T W X beta,
    sum log sd^2 = sum_observed log known^2 + sum_g n_g log s_g^2.

:meth:`~LinearGaussianLikelihood.log_marginal_from_statistics` evaluates the log marginal above
from them: O(P^2 + K^2) work per task whatever its number of observations, which is what
type-II ML over many tasks iterates on (:func:`hiermeta.type2_ml`).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints

from .sites import GlobalParam
from .tasks import GaussianData, GaussianLikelihood

__all__ = ["LinearDesign", "LinearGaussianLikelihood", "LinearGaussianStatistics", "linear_gaussian"]


class LinearDesign(NamedTuple):
    """The inputs of a linear-Gaussian task: ``random`` ``Z`` ``(T, N, D, P)``, optional ``fixed``
    ``X`` ``(T, N, D, K)`` and ``offset`` ``(T, N, D)``.  A bare array as inputs means ``Z``."""

    random: Any
    fixed: Any = None
    offset: Any = None


def _design(inputs) -> LinearDesign:
    return inputs if isinstance(inputs, LinearDesign) else LinearDesign(inputs)


class LinearGaussianStatistics(NamedTuple):
    """Per-task sufficient statistics of a linear-Gaussian likelihood (the module docstring): leading
    task axis ``T`` and noise-group axis ``G``; ``K = num_fixed`` (the ``X`` fields are None for 0).

    Attributes:
      ZZ ``(T, G, P, P)``, ZX ``(T, G, P, K)``, XX ``(T, G, K, K)``, Zy ``(T, G, P)``,
      Xy ``(T, G, K)``, yy ``(T, G)``: the weighted sums with the known weights W0;
      count ``(T, G)``: observed scalars; log_det_known ``(T,)``: sum of log(known sd^2) over them;
      task_covariates ``(T, Q)`` or None.
    """

    ZZ: Any
    Zy: Any
    yy: Any
    count: Any
    log_det_known: Any
    ZX: Any = None
    XX: Any = None
    Xy: Any = None
    task_covariates: Any = None


def _check_columns(Z, P: int) -> None:
    """At trace time, before XLA sees the shapes: the design of theta has P columns."""
    if np.shape(Z)[-1] != P:
        raise ValueError(f"the design has P = {np.shape(Z)[-1]} columns but the model has P = {P} parameters")


def column_spread(columns: np.ndarray) -> np.ndarray:
    """Standard deviation of each design column, its root mean square when it is constant (1 if 0)."""
    sd, rms = np.std(columns, axis=0), np.sqrt(np.mean(columns**2, axis=0))
    out = np.where(sd > 1e-12 * np.maximum(rms, 1e-300), sd, rms)
    return np.where(out > 0, out, 1.0)


def _real(name: str, value) -> np.ndarray:
    """``value`` as float64, refusing text (which NumPy would parse) and complex numbers (whose
    imaginary part it would drop)."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    return arr.astype(float)


def regression_prior_scales(start: Mapping[str, Any], scale: float, random_columns: np.ndarray,
                            fixed_columns: Optional[np.ndarray], model, data) -> dict:
    """Data-scaled hyperpriors of a regression likelihood (rstanarm's autoscaling), shared by the
    linear-Gaussian likelihood and the GLM families.

    With ``s`` = ``scale`` (sd(y), or 1 on a logit / log link) and ``s(c)`` the spread of column
    ``c`` (:func:`column_spread`) over the observed rows: phi ~ N(start, (2.5 s / s(Z_p))^2), the
    sigma scale of module m the mean of ``s / s(Z_p)`` over its coordinates, gamma ~ N(start,
    (2.5 s / (s(z_q) s(Z_p)))^2) and beta ~ N(start, (2.5 s / s(X_k))^2).  ``start`` holds the
    pooled fit (``phi``, and ``gamma``, ``beta`` where the model has them).
    """
    s_z = column_spread(random_columns)
    index = model.partition.index
    counts = np.bincount(index, minlength=model.partition.num_modules)
    out = {
        "phi_loc": start["phi"],
        "phi_scale": 2.5 * scale / s_z,
        "sigma_scale": np.bincount(index, weights=scale / s_z, minlength=len(counts)) / counts,
        "global_priors": {},
    }
    if model.num_task_covariates:
        s_q = column_spread(np.asarray(model.task_covariates(data), float))
        out["gamma_prior"] = dist.Normal(jnp.asarray(start["gamma"]),
                                         jnp.asarray(2.5 * scale / (s_q[:, None] * s_z[None, :])))
    if fixed_columns is not None:
        s_x = column_spread(fixed_columns)
        out["global_priors"]["beta"] = dist.Normal(jnp.asarray(start["beta"]), jnp.asarray(2.5 * scale / s_x))
    return out


class LinearGaussianLikelihood(GaussianLikelihood):
    """``x = Z theta + X beta + offset + noise``, with closed-form marginal likelihood and posterior.

    ``num_fixed = K > 0`` adds the global parameter ``beta`` ``(K,)`` (unpooled fixed effects, a
    flat prior unless one is given); ``noise="learned"`` the global ``noise_sd``.  Task data is a
    :class:`~hiermeta.GaussianData` whose ``inputs`` is a :class:`LinearDesign` (or the ``Z`` array).
    """

    def __init__(self, *, noise: str = "known", noise_shape: tuple = (), num_fixed: int = 0,
                 noise_prior=None, noise_init=None, beta_prior=None, site: str = "obs"):
        if isinstance(num_fixed, bool) or int(num_fixed) != num_fixed or num_fixed < 0:
            raise ValueError(f"num_fixed must be an integer >= 0, got {num_fixed!r}")
        self.num_fixed = int(num_fixed)
        extra = {"beta": GlobalParam((self.num_fixed,), constraints.real, beta_prior)} if self.num_fixed else None
        super().__init__(self._mean, site, noise=noise, noise_shape=noise_shape,
                         noise_prior=noise_prior, noise_init=noise_init, globals=extra)
        self.linear_globals = ("beta",) if self.num_fixed else ()

    def _mean(self, theta, inputs, g=None):
        design = _design(inputs)
        theta = ravel_pytree(theta)[0]  # the flat coordinates, in the partition's order
        _check_columns(design.random, theta.shape[-1])
        mu = jnp.einsum("ndp,p->nd", design.random, theta)
        if self.num_fixed:
            mu = mu + jnp.einsum("ndk,k->nd", design.fixed, g["beta"])
        if design.offset is not None:
            mu = mu + design.offset
        return mu

    def check(self, data: GaussianData, where: str) -> None:
        super().check(data, where)
        design = _design(data.inputs)
        T, N, D = np.shape(data.obs)
        Z = np.shape(design.random) if design.random is not None else None
        if Z is None or len(Z) != 4 or Z[:3] != (T, N, D):
            raise ValueError(f"{where}: the design Z must have shape ({T}, {N}, {D}, P), got {Z}")
        if self.num_fixed:
            X = None if design.fixed is None else np.shape(design.fixed)
            if X != (T, N, D, self.num_fixed):
                raise ValueError(
                    f"{where}: the fixed-effects design X must have shape ({T}, {N}, {D}, {self.num_fixed}), got {X}"
                )
        elif design.fixed is not None:
            raise ValueError(f"{where}: a fixed-effects design was given but the likelihood has num_fixed=0")
        if design.offset is not None and np.shape(design.offset) != (T, N, D):
            raise ValueError(f"{where}: offset must have shape ({T}, {N}, {D}), got {np.shape(design.offset)}")

    def make_data(self, response, mask, random, fixed=None, offset=None, task_covariates=None,
                  noise_scale=None) -> GaussianData:
        """Task data from padded per-group arrays of one scalar response (the layout
        :func:`hiermeta.from_table` builds for every likelihood).

        Args:
          response, mask: ``(T, N)``; padding (``mask`` False) may hold anything.
          random: ``(T, N, P)`` design of theta; fixed: ``(T, N, K)`` design of beta
            (``K = num_fixed``); offset: ``(T, N)``; task_covariates: ``(T, Q)``.
          noise_scale: ``(T, N)`` known noise sd (``noise="known"``) or known relative scales
            (``noise="learned"``); default 1.
        """
        response = _real("response", response)
        if response.ndim != 2:
            raise ValueError(f"response must have shape (groups, observations), got {np.shape(response)}")
        add_dim = lambda name, a: None if a is None else _real(name, a)[:, :, None]
        design = LinearDesign(add_dim("random", random), add_dim("fixed", fixed), add_dim("offset", offset))
        scale = 1.0 if noise_scale is None else add_dim("noise_scale", noise_scale)
        data = GaussianData.create(response[..., None], scale, inputs=design, mask=mask,
                                   task_covariates=task_covariates)
        self.check(data, "data")
        return data

    def initial_values(self, data: GaussianData, model=None) -> dict:
        """Starting values on the data's own scale (for type-II ML and the learners).

        A pooled weighted least-squares fit of ``x ~ Z phi + X beta (+ Z z_t gamma)`` gives phi,
        beta, gamma and the residual rms ``s`` (the noise sd when it is learned); each module's
        sigma starts at ``s / rms(Z_p)`` averaged over its coordinates: the size of a coordinate's
        effect that moves the response by one residual sd.
        """
        design = _design(data.inputs)
        obs, mask = np.asarray(data.obs, float), np.asarray(data.mask, bool)
        observed = np.broadcast_to(mask[..., None], obs.shape)
        Z = np.asarray(design.random, float)[observed]  # (n, P)
        columns = [Z]
        Q = 0 if model is None else int(model.num_task_covariates)
        if Q:
            z = np.asarray(model.task_covariates(data), float)  # (T, Q)
            zt = np.broadcast_to(z[:, None, None, :], obs.shape + (Q,))[observed]  # (n, Q)
            columns.append((zt[:, :, None] * Z[:, None, :]).reshape(Z.shape[0], -1))
        if self.num_fixed:
            columns.append(np.asarray(design.fixed, float)[observed])
        y = obs[observed]
        if design.offset is not None:
            y = y - np.asarray(design.offset, float)[observed]
        w = 1.0 / np.asarray(data.noise_sd, float)[observed]
        A = np.concatenate(columns, axis=1)
        coef = np.linalg.lstsq(A * w[:, None], y * w, rcond=None)[0]
        resid = y - A @ coef
        P = Z.shape[1]
        out = {"phi": coef[:P]}
        if Q:
            out["gamma"] = coef[P:P + Q * P].reshape(Q, P)
        if self.num_fixed:
            out["beta"] = coef[-self.num_fixed:]
        scale = float(np.sqrt(np.mean((resid * w) ** 2))) if self.noise == "learned" else float(np.sqrt(np.mean(resid**2)))
        scale = scale if np.isfinite(scale) and scale > 0 else 1.0
        if self.noise == "learned":
            out["noise_sd"] = np.full(tuple(self.global_params["noise_sd"].shape), scale)
        rms = np.sqrt(np.mean(Z**2, axis=0))
        per_coord = scale / np.where(rms > 0, rms, 1.0)
        if model is not None:
            index = model.partition.index
            counts = np.bincount(index, minlength=model.partition.num_modules)
            out["sigma"] = np.bincount(index, weights=per_coord, minlength=model.partition.num_modules) / counts
        return out

    def prior_scales(self, data: GaussianData, model) -> dict:
        """Data-scaled default hyperpriors (:func:`hiermeta.with_priors`): centred at the pooled
        least-squares fit, ``2.5 sd(y) / s(column)`` wide, ``sigma`` scales ``sd(y) / s(column)``,
        the noise sd ``Exponential(1 / sd(y))``."""
        design = _design(data.inputs)
        obs, mask = np.asarray(data.obs, float), np.asarray(data.mask, bool)
        observed = np.broadcast_to(mask[..., None], obs.shape)
        y = obs[observed]
        sd_y = float(np.std(y))
        sd_y = sd_y if sd_y > 0 else 1.0

        start = self.initial_values(data, model)
        out = regression_prior_scales(
            start, sd_y, np.asarray(design.random, float)[observed],
            np.asarray(design.fixed, float)[observed] if self.num_fixed else None, model, data)
        if self.noise == "learned":
            shape = tuple(self.global_params["noise_sd"].shape)
            out["global_priors"]["noise_sd"] = dist.Exponential(jnp.full(shape, 1.0 / sd_y))
        return out

    # ------------------------------------------------------------------ closed forms
    def _sufficient(self, data: GaussianData, prior_mean, g):
        """``(F, b, quad, log_det_noise, n)`` per task for the residual r = x - Z m - X beta - offset."""
        design = _design(data.inputs)
        Z = design.random
        _check_columns(Z, jnp.shape(prior_mean)[-1])
        mean = jnp.einsum("tndp,tp->tnd", Z, jnp.broadcast_to(prior_mean, (Z.shape[0], Z.shape[-1])))
        if self.num_fixed:
            mean = mean + jnp.einsum("tndk,k->tnd", design.fixed, g["beta"])
        if design.offset is not None:
            mean = mean + design.offset
        observed = jnp.broadcast_to(data.mask[..., None], data.obs.shape)
        sd = self.sd(data, g)
        w = jnp.where(observed, sd**-2.0, 0.0)
        resid = jnp.where(observed, data.obs - mean, 0.0)
        F = jnp.einsum("tndp,tnd,tndq->tpq", Z, w, Z)
        b = jnp.einsum("tndp,tnd,tnd->tp", Z, w, resid)
        quad = jnp.sum(w * resid**2, axis=(1, 2))
        log_det_noise = jnp.sum(jnp.where(observed, 2.0 * jnp.log(sd), 0.0), axis=(1, 2))
        return F, b, quad, log_det_noise, jnp.sum(observed, axis=(1, 2))

    def noise_groups(self, shape: tuple) -> Optional[np.ndarray]:
        """Index ``(N, D)`` of the learned noise sd ``s_g`` each observed scalar of a task of ``shape``
        ``(N, D)`` uses (``g`` in ``0..G-1``, row-major over ``noise_shape``); None when the noise is
        known or its shape varies over tasks (then there are no per-task statistics)."""
        if self.noise != "learned":
            return np.zeros(tuple(shape), dtype=int)
        noise_shape = tuple(self.global_params["noise_sd"].shape)
        if len(noise_shape) > len(shape):
            return None
        try:
            return np.broadcast_to(np.arange(int(np.prod(noise_shape))).reshape(noise_shape), tuple(shape))
        except ValueError:
            return None

    def sufficient_statistics(self, data: GaussianData, task_covariates=None) -> LinearGaussianStatistics:
        """The per-task sums from which :meth:`log_marginal_from_statistics` gives the log marginal
        (module docstring).  Jittable; padding (``mask`` False) counts nowhere."""
        design = _design(data.inputs)
        Z = design.random
        groups = self.noise_groups(data.obs.shape[1:])
        if groups is None:
            raise ValueError(
                f"a learned noise sd of shape {tuple(self.global_params['noise_sd'].shape)} does not broadcast to "
                f"one task's observations {tuple(data.obs.shape[1:])}: no per-task sufficient statistics"
            )
        onehot = jnp.asarray(groups[..., None] == np.arange(int(groups.max()) + 1), Z.dtype)  # (N, D, G)
        observed = jnp.broadcast_to(data.mask[..., None], data.obs.shape)
        w = jnp.where(observed, data.noise_sd, 1.0) ** -2.0
        w = jnp.where(observed, w, 0.0)  # (T, N, D)
        y = jnp.where(observed, data.obs - (0.0 if design.offset is None else design.offset), 0.0)
        wg = jnp.einsum("tnd,ndg->tndg", w, onehot)
        out = dict(
            ZZ=jnp.einsum("tndp,tndg,tndq->tgpq", Z, wg, Z),
            Zy=jnp.einsum("tndp,tndg,tnd->tgp", Z, wg, y),
            yy=jnp.einsum("tndg,tnd->tg", wg, y**2),
            count=jnp.einsum("tnd,ndg->tg", observed.astype(Z.dtype), onehot),
            log_det_known=jnp.sum(jnp.where(observed, 2.0 * jnp.log(jnp.where(observed, data.noise_sd, 1.0)), 0.0),
                                  axis=(1, 2)),
            task_covariates=task_covariates,
        )
        if self.num_fixed:
            X = design.fixed
            out.update(ZX=jnp.einsum("tndp,tndg,tndk->tgpk", Z, wg, X),
                       XX=jnp.einsum("tndk,tndg,tndl->tgkl", X, wg, X),
                       Xy=jnp.einsum("tndk,tndg,tnd->tgk", X, wg, y))
        return LinearGaussianStatistics(**out)

    def log_marginal_from_statistics(self, stats: LinearGaussianStatistics, prior_mean, prior_scale_tril,
                                     g: Optional[Mapping] = None):
        """:meth:`log_marginal` from :meth:`sufficient_statistics` instead of the observations: the same
        value (to rounding), O(P^2 + K^2) per task."""
        G = stats.count.shape[-1]
        if self.noise == "learned":
            s2 = jnp.reshape(jnp.asarray(g["noise_sd"]) ** 2, (-1,))
            inv = jnp.broadcast_to(1.0 / s2, (G,))
            log_s2 = jnp.broadcast_to(jnp.log(s2), (G,))
        else:
            inv, log_s2 = jnp.ones(G), jnp.zeros(G)
        F = jnp.einsum("tgpq,g->tpq", stats.ZZ, inv)
        Zy = jnp.einsum("tgp,g->tp", stats.Zy, inv)
        quad = jnp.einsum("tg,g->t", stats.yy, inv)
        m = jnp.broadcast_to(prior_mean, Zy.shape)
        Fm = jnp.einsum("tpq,tq->tp", F, m)
        b = Zy - Fm
        quad = quad - 2.0 * jnp.sum(m * Zy, -1) + jnp.sum(m * Fm, -1)
        if self.num_fixed:
            beta = g["beta"]
            ZXb = jnp.einsum("tgpk,g,k->tp", stats.ZX, inv, beta)
            XXb = jnp.einsum("tgkl,g,l->tk", stats.XX, inv, beta)
            Xy = jnp.einsum("tgk,g->tk", stats.Xy, inv)
            b = b - ZXb
            quad = quad + 2.0 * jnp.sum(m * ZXb, -1) - 2.0 * (Xy @ beta) + XXb @ beta
        log_det_noise = stats.log_det_known + stats.count @ log_s2
        return self._log_marginal_core(F, b, quad, log_det_noise, jnp.sum(stats.count, -1), prior_scale_tril)

    @staticmethod
    def _log_marginal_core(F, b, quad, log_det_noise, n, prior_scale_tril):
        """The log marginal from ``F``, ``b``, ``r^T W r``, ``sum log sd^2`` and ``n`` (module docstring)."""
        L = jnp.asarray(prior_scale_tril)
        B = jnp.eye(L.shape[0]) + jnp.einsum("pi,tpq,qj->tij", L, F, L)
        chol = jnp.linalg.cholesky(B)
        c = b @ L  # (T, P): L^T b per task
        z = jax.scipy.linalg.solve_triangular(chol, c[..., None], lower=True)[..., 0]
        log_det_B = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
        return -0.5 * (quad - jnp.sum(z**2, -1) + log_det_B + log_det_noise + n * jnp.log(2.0 * jnp.pi))

    def log_marginal(self, data: GaussianData, prior_mean, prior_scale_tril, g: Optional[Mapping] = None):
        """``log p(D_t | m_t, Sigma = L L^T, g)`` per task ``(T,)``, theta integrated out exactly.

        ``prior_mean`` ``(P,)`` or ``(T, P)``; ``prior_scale_tril`` ``L`` ``(P, P)``.
        """
        return self._log_marginal_core(*self._sufficient(data, prior_mean, g), prior_scale_tril)

    def posterior(self, data: GaussianData, prior_mean, prior_scale_tril, g: Optional[Mapping] = None):
        """Posterior of each task's theta: mean (= MAP) ``(T, P)`` and covariance ``(T, P, P)``."""
        F, b, _, _, _ = self._sufficient(data, prior_mean, g)
        L = jnp.asarray(prior_scale_tril)
        B = jnp.eye(L.shape[0]) + jnp.einsum("pi,tpq,qj->tij", L, F, L)
        B_inv = jnp.linalg.inv(B)
        B_inv = 0.5 * (B_inv + jnp.swapaxes(B_inv, -1, -2))
        cov = jnp.einsum("pi,tij,qj->tpq", L, B_inv, L)
        mean = jnp.broadcast_to(prior_mean, b.shape) + jnp.einsum("tpq,tq->tp", cov, b)
        return mean, cov


def linear_gaussian(**kwargs) -> LinearGaussianLikelihood:
    """:class:`LinearGaussianLikelihood` (``noise="known" | "learned"``, ``num_fixed=K``, ...)."""
    return LinearGaussianLikelihood(**kwargs)
