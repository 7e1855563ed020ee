"""What the GLM families share: their data, the linear predictor, validation and starting values.

Observation ``n`` of task ``t`` is one scalar ``y_{t,n}`` whose distribution depends on the task
parameters through a *linear predictor* on the link scale,

    eta_{t,n} = Z_{t,n} . theta_t + X_{t,n} . beta + offset_{t,n},

``Z`` ``(T, N, P)`` the design of the task parameters (the random effects: ``theta_t ~ N(phi,
Sigma)``), ``X`` ``(T, N, K)`` that of ``beta``, unpooled fixed effects shared by every task (a
global parameter of the model), and a known offset (``log`` exposure for counts).  A family then
says how ``y`` depends on ``eta`` (its NumPyro distribution); this is a generalised linear mixed
model as lme4's ``glmer`` fits it: ``theta_t - phi`` are the random effects, ``phi`` and ``beta``
the fixed effects.

Each family is a :class:`~hiermeta.tasks.TaskLikelihood`, so every learner, ``run_nuts``, ``laplace``,
type-II ML (:func:`hiermeta.type2_ml` by the Laplace or quadrature approximation) and the
predictive scores take it unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.flatten_util import ravel_pytree
from numpyro.distributions import constraints

from ..regression import LinearDesign, linear_predictor, module_mean, regression_prior_scales
from ..sites import GlobalParam
from ..tasks import boolean_mask, check_task_covariates, real_array

__all__ = ["GLMData", "GLMLikelihood", "flat_theta"]


class GLMData(NamedTuple):
    """Scalar observations of a batch of tasks for a GLM family (build it with the family's ``make_data``).

    Attributes:
      response: ``(T, N)`` the observations (counts for the discrete families; 0 at padding).
      mask: ``(T, N)`` booleans; False marks padding, so tasks may hold unequal numbers of observations.
      design: :class:`~hiermeta.LinearDesign` with ``random`` ``Z`` ``(T, N, P)``, optional
        ``fixed`` ``X`` ``(T, N, K)`` and ``offset`` ``(T, N)`` (with exposures folded in as logs).
      trials: ``(T, N)`` number of trials of each binomial observation (None for other families).
      task_covariates: optional ``(T, Q)`` covariates of each task (group-level predictors).
    """

    response: jax.Array
    mask: jax.Array
    design: LinearDesign
    trials: Any = None
    task_covariates: Any = None


def flat_theta(theta) -> jax.Array:
    """``(T, P)`` flat task parameters from a pytree whose leaves have a leading task axis."""
    return jax.vmap(lambda th: ravel_pytree(th)[0])(theta)


class GLMLikelihood:
    """Base class of the GLM families: ``y_{t,n} ~ family(eta_{t,n})`` with the linear predictor above.

    Subclasses set ``name`` and ``discrete`` and implement :meth:`distribution` (the NumPyro
    distribution of every observation given eta and the globals) and :meth:`cdf_from_eta`; they
    may declare more global parameters (the Student-t's scale and degrees of freedom) in
    :meth:`_family_globals`.

    The family protocol, in full (data: class attributes; hooks: methods with a default here):

    * ``name``, ``discrete`` (integer responses: randomised PIT), ``binary`` (0/1 responses),
      ``takes_trials`` (its data carry ``trials``, the binomial);
    * :meth:`distribution` and :meth:`cdf_from_eta` (required);
    * :meth:`_pooled_fit` (required for starts): the pooled GLM's coefficients and the link
      scale's unit;
    * :meth:`_check_family` (response checks), :meth:`_family_globals` (extra globals),
      :meth:`_family_start` (their starts), :meth:`_family_priors` (their data-scaled priors),
      :meth:`_response_scale` (the response's scale for priors) — optional, default "none".

    Args:
      num_fixed: K, the number of unpooled fixed effects (global ``beta`` ``(K,)``, flat prior
        unless ``beta_prior`` is given); 0 for none.
      site: name of the observed NumPyro site.
    """

    name = "glm"
    discrete = False
    binary = False
    takes_trials = False

    def __init__(self, *, num_fixed: int = 0, beta_prior=None, site: str = "obs"):
        if isinstance(num_fixed, bool) or int(num_fixed) != num_fixed or num_fixed < 0:
            raise ValueError(f"num_fixed must be an integer >= 0, got {num_fixed!r}")
        self.num_fixed = int(num_fixed)
        self.site = site
        declared = {}
        if self.num_fixed:
            declared["beta"] = GlobalParam((self.num_fixed,), constraints.real, beta_prior)
        declared.update(self._family_globals())
        self.global_params = declared
        self.linear_globals = ("beta",) if self.num_fixed else ()

    # ------------------------------------------------------------------ what a family supplies
    def _family_globals(self) -> dict:
        return {}

    def distribution(self, eta, data: GLMData, g: Optional[Mapping[str, Any]] = None) -> dist.Distribution:
        """The NumPyro distribution of every observation, batch shape ``(T, N)``, given eta ``(T, N)``."""
        raise NotImplementedError

    def cdf_from_eta(self, eta, data: GLMData, value, g: Optional[Mapping[str, Any]] = None) -> jax.Array:
        """``P(y <= value)`` of every observation ``(T, N)`` given eta (``value`` ``(T, N)``)."""
        raise NotImplementedError

    def _check_family(self, data: GLMData, where: str, observed: np.ndarray) -> None:
        """Family-specific checks of the observed responses (counts, trials, ...)."""

    def _pooled_fit(self, A: np.ndarray, data: GLMData, observed: np.ndarray, offset: np.ndarray):
        """Coefficients of the pooled (no random effects) GLM on the columns ``A`` ``(n, k)``, and the
        family's unit on the link scale (1 for a logit or log link, the residual scale for identity)."""
        raise NotImplementedError

    def _family_start(self, data: GLMData, observed: np.ndarray, link_scale: float) -> dict:
        return {}

    def _family_priors(self, data: GLMData, observed: np.ndarray) -> dict:
        return {}

    def _response_scale(self, data: GLMData, observed: np.ndarray) -> float:
        """rstanarm's autoscale: sd(y) for an identity link, 1 on a logit or log link."""
        return 1.0

    # ------------------------------------------------------------------ the likelihood
    def linear_predictor(self, theta, data: GLMData, g: Optional[Mapping[str, Any]] = None) -> jax.Array:
        """``eta`` ``(T, N)`` from task parameters with a leading task axis (a pytree or ``(T, P)``)."""
        th = theta if isinstance(theta, jax.Array) and theta.ndim == 2 else flat_theta(theta)
        return linear_predictor(data.design, th[:, None, :], g["beta"] if self.num_fixed else None)

    def __call__(self, theta, data: GLMData, g: Optional[Mapping[str, Any]] = None) -> None:
        fn = self.distribution(self.linear_predictor(theta, data, g), data, g)
        numpyro.sample(self.site, fn.mask(data.mask).to_event(1), obs=data.response)

    def cdf(self, theta, data: GLMData, value, g: Optional[Mapping[str, Any]] = None) -> jax.Array:
        """Predictive CDF ``P(y_{t,n} <= value_{t,n} | theta_t, g)`` ``(T, N)`` (theta ``(T, P)`` or a pytree)."""
        return self.cdf_from_eta(self.linear_predictor(theta, data, g), data, value, g)

    def mean(self, theta, data: GLMData, g: Optional[Mapping[str, Any]] = None) -> jax.Array:
        """``E[y_{t,n} | theta_t, g]`` ``(T, N)``."""
        return self.distribution(self.linear_predictor(theta, data, g), data, g).mean

    def num_observations(self, data: GLMData) -> jax.Array:
        return jnp.sum(data.mask, axis=-1)

    def log_normaliser(self, data: GLMData) -> jax.Array:
        """``(T,)`` the part of ``log p(data | theta, g)`` that depends on neither (0 by default)."""
        return jnp.zeros(data.mask.shape[0])

    # ------------------------------------------------------------------ user data
    def make_data(self, response, mask=None, random=None, fixed=None, offset=None,
                  task_covariates=None) -> GLMData:
        """Validate user data (NumPy in, checked before anything is compiled) into :class:`GLMData`.

        ``response`` ``(T, N)``; ``mask`` ``(T, N)`` (default all observed; padded entries may
        hold anything, NaN included); ``random`` ``(T, N, P)`` the design of theta (e.g. a column
        of ones for a random intercept); ``fixed`` ``(T, N, K)`` that of beta (required when the
        family has ``num_fixed = K > 0``); ``offset`` ``(T, N)``; ``task_covariates`` ``(T, Q)``.
        """
        return self._validated(self._assemble(response, mask, random, fixed, offset, task_covariates))

    def _validated(self, data: GLMData) -> GLMData:
        self.check(data, "data")
        return jax.tree_util.tree_map(jnp.asarray, data)

    def _assemble(self, response, mask, random, fixed, offset, task_covariates, trials=None) -> GLMData:
        y = np.asarray(response)
        if y.ndim != 2:
            raise ValueError(f"response must have shape (tasks, observations), got {y.shape}")
        y = real_array(y, "response", booleans=False)
        mask = boolean_mask(mask, y.shape)
        T, N = y.shape
        if random is None:
            raise ValueError(f"random: the design of the task parameters, shape ({T}, {N}, P), is required")
        Z = real_array(random, "random (the design Z)", booleans=False)
        X = None if fixed is None else real_array(fixed, "fixed (the design X)", booleans=False)
        off = None if offset is None else real_array(offset, "offset", booleans=False)
        n = None if trials is None else real_array(trials, "trials", booleans=False)
        if n is not None and n.shape != (T, N):
            raise ValueError(f"trials must have shape {(T, N)}, got {n.shape}")
        keep = lambda a, fill: None if a is None else (
            np.where(mask.reshape(mask.shape + (1,) * (a.ndim - 2)), a, fill) if a.shape[:2] == (T, N) else a)
        # padding never reaches a density, but keep it valid so no NaN leaks into gradients
        data = GLMData(
            response=np.where(mask, y, 0.0),
            mask=mask,
            design=LinearDesign(keep(Z, 0.0), keep(X, 0.0), keep(off, 0.0)),
            trials=keep(n, 1.0),
            task_covariates=(None if task_covariates is None
                             else real_array(task_covariates, "task_covariates", booleans=False)),
        )
        return data

    def check(self, data: GLMData, where: str) -> None:
        """Raise ``ValueError`` naming the problem if concrete ``data`` is malformed."""
        if not isinstance(data, GLMData):
            raise ValueError(f"{where}: expected GLMData (from the family's make_data), got {type(data).__name__}")
        y = np.asarray(data.response)
        if y.ndim != 2:
            raise ValueError(f"{where}: response must have shape (tasks, observations), got {y.shape}")
        T, N = y.shape
        if T == 0 or N == 0:
            raise ValueError(f"{where} is empty: response has shape {y.shape}")
        mask = np.asarray(data.mask)
        if mask.shape != (T, N) or mask.dtype != bool:
            raise ValueError(f"{where}: mask must be boolean with shape {(T, N)}, got {mask.dtype} {mask.shape}")
        empty = np.flatnonzero(mask.sum(axis=1) == 0)
        if empty.size:
            raise ValueError(f"{where}: task(s) {empty[:10].tolist()} hold no observations (every task needs one)")
        if not np.all(np.isfinite(y[mask])):
            raise ValueError(f"{where}: response holds {int(np.sum(~np.isfinite(y) & mask))} NaN or infinite value(s)")
        design = data.design
        if not isinstance(design, LinearDesign):
            raise ValueError(f"{where}: design must be a hiermeta.LinearDesign")
        Z = np.asarray(design.random) if design.random is not None else None
        if Z is None or Z.ndim != 3 or Z.shape[:2] != (T, N):
            raise ValueError(f"{where}: the design Z (random) must have shape ({T}, {N}, P), got "
                             f"{None if Z is None else Z.shape}")
        if not np.all(np.isfinite(Z)):
            raise ValueError(f"{where}: the design Z (random) holds NaN or infinite values")
        if self.num_fixed:
            X = None if design.fixed is None else np.asarray(design.fixed)
            if X is None or X.shape != (T, N, self.num_fixed):
                raise ValueError(f"{where}: the fixed-effects design X (fixed) must have shape "
                                 f"({T}, {N}, {self.num_fixed}), got {None if X is None else X.shape}")
            if not np.all(np.isfinite(X)):
                raise ValueError(f"{where}: the fixed-effects design X (fixed) holds NaN or infinite values")
        elif design.fixed is not None:
            raise ValueError(f"{where}: a fixed-effects design was given but the family has num_fixed=0 "
                             "(give num_fixed=K when building it)")
        if design.offset is not None:
            off = np.asarray(design.offset)
            if off.shape != (T, N):
                raise ValueError(f"{where}: offset must have shape {(T, N)}, got {off.shape}")
            if not np.all(np.isfinite(off[mask])):
                raise ValueError(f"{where}: offset holds NaN or infinite values")
        if data.trials is not None and not self.takes_trials:
            raise ValueError(f"{where}: trials are given but the {self.name} family takes none")
        if data.trials is None and self.takes_trials:
            raise ValueError(f"{where}: the {self.name} family needs the trials of every observation")
        self._check_family(data, where, mask)
        check_task_covariates(data.task_covariates, T, where)

    # ------------------------------------------------------------------ starting values and priors
    def _columns(self, data: GLMData, model, observed: np.ndarray):
        Z = np.asarray(data.design.random, float)[observed]  # (n, P)
        columns = [Z]
        Q = 0 if model is None else int(model.num_task_covariates)
        if Q:
            z = np.asarray(model.task_covariates(data), float)
            zt = np.broadcast_to(z[:, None, :], observed.shape + (Q,))[observed]
            columns.append((zt[:, :, None] * Z[:, None, :]).reshape(Z.shape[0], -1))
        if self.num_fixed:
            columns.append(np.asarray(data.design.fixed, float)[observed])
        offset = (np.zeros(Z.shape[0]) if data.design.offset is None
                  else np.asarray(data.design.offset, float)[observed])
        return Z, np.concatenate(columns, axis=1), Q, offset

    def initial_values(self, data: GLMData, model=None) -> dict:
        """Starting values on the link scale (for type-II ML and the learners).

        The pooled GLM (every task the same theta) fitted by Newton's method gives phi, gamma,
        beta (and the family's globals); each module's sigma starts at ``u / rms(Z_p)`` averaged
        over its coordinates, ``u`` one unit of the link scale (1 on the logit and log scales,
        the residual scale for an identity link): random effects of that size move a linear
        predictor by a unit.
        """
        observed = np.asarray(data.mask, bool)
        Z, A, Q, offset = self._columns(data, model, observed)
        coef, link_scale = self._pooled_fit(A, data, observed, offset)
        P = Z.shape[1]
        out = {"phi": coef[:P]}
        if Q:
            out["gamma"] = coef[P:P + Q * P].reshape(Q, P)
        if self.num_fixed:
            out["beta"] = coef[A.shape[1] - self.num_fixed:]
        out.update(self._family_start(data, observed, link_scale))
        if model is not None:
            rms = np.sqrt(np.mean(Z**2, axis=0))
            out["sigma"] = module_mean(model, link_scale / np.where(rms > 0, rms, 1.0))
        return out

    def prior_scales(self, data: GLMData, model) -> dict:
        """Data-scaled hyperpriors (:func:`hiermeta.with_priors`), rstanarm's autoscaling on the link
        scale: with ``s_y`` = 1 for a logit or log link (sd(y) for an identity link), phi ~ N(pooled
        fit, (2.5 s_y / s(Z_p))^2), sigma scale ``s_y / s(Z_m)``, beta ~ N(pooled fit, (2.5 s_y / s(X_k))^2),
        and the family's own globals (e.g. the Student-t's scale and degrees of freedom)."""
        observed = np.asarray(data.mask, bool)
        s_y = self._response_scale(data, observed)
        start = self.initial_values(data, model)
        fixed = np.asarray(data.design.fixed, float)[observed] if self.num_fixed else None
        out = regression_prior_scales(start, s_y, np.asarray(data.design.random, float)[observed], fixed, model, data)
        out["global_priors"].update(self._family_priors(data, observed))
        return out


def newton_glm(A: np.ndarray, gradient_and_weights, num_steps: int = 100, ridge: float = 1e-8) -> np.ndarray:
    """Pooled GLM coefficients by Newton's method (a tiny ridge keeps separated data finite).

    ``gradient_and_weights(eta) -> (d loglik / d eta, -d^2 loglik / d eta^2)`` per observation;
    the log-likelihood is concave in the coefficients for the canonical links used here, so
    undamped Newton steps (each coordinate's step clipped to 5 units of its column's scale, against
    the wild first steps of separated data) converge; it stops once a step moves every coordinate
    by less than 1e-10 of its scale.

    A host (NumPy) twin of :func:`hiermeta.solvers.damped_newton`, kept on purpose: the pooled start
    runs once per data set over every observed row (any number of them), needs no derivative, and
    costs milliseconds in NumPy, where a compiled version would cost an XLA compilation (about a
    second here) for every new data shape before the fit proper starts.
    """
    coef = np.zeros(A.shape[1])
    scale = np.maximum(np.sqrt(np.mean(A**2, axis=0)), 1e-12)
    for _ in range(num_steps):
        grad_eta, weight = gradient_and_weights(A @ coef)
        grad = A.T @ grad_eta - ridge * coef * scale**2
        hess = (A * weight[:, None]).T @ A + ridge * np.diag(scale**2)
        step = np.linalg.solve(hess, grad)
        step = np.clip(step, -5.0 / scale, 5.0 / scale)  # no wild first steps from separation
        coef = coef + step
        if np.max(np.abs(step * scale)) < 1e-10:
            break
    return coef
