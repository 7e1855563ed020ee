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

import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import scipy.sparse
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from .batched_spd import quad_logdet, trace_solve_logdet
from .regression import LinearDesign, linear_predictor, min_norm_solve, module_mean, regression_prior_scales
from .sites import GlobalParam
from .tasks import TaskBatch, all_finite, boolean_mask, check_task_covariates, distinct, merge_splits, real_array

__all__ = ["GaussianData", "GaussianLikelihood", "LinearDesign", "LinearGaussianLikelihood", "LinearGaussianStatistics",
           "GroupedStatistics", "PooledMoments", "group_statistics", "linear_gaussian"]


class GaussianData(NamedTuple):
    """Observations of a batch of tasks with known Gaussian noise.

    Attributes:
      obs: ``(T, N, D)`` observations (zero where ``mask`` is False).
      noise_sd: ``(T, N, D)`` known observation noise standard deviations (> 0).
      mask: ``(T, N)`` booleans; False marks padding, so tasks may hold unequal numbers of
        observations.
      inputs: optional pytree with leaves of leading shape ``(T, N, ...)`` (covariates, design
        rows) passed to the mean function.
      task_covariates: optional ``(T, Q)`` covariates of each task (group-level predictors: the
        prior mean of task t is ``phi + z_t @ gamma`` in a model with ``num_task_covariates=Q``).

    With a likelihood of unknown noise (``GaussianLikelihood(..., noise="learned")``),
    ``noise_sd`` holds known *relative* scales (1 by default) multiplying the learned noise sd.
    """

    obs: jax.Array
    noise_sd: jax.Array
    mask: jax.Array
    inputs: Any = None
    task_covariates: Any = None

    @classmethod
    def create(cls, obs, noise_sd=1.0, inputs=None, mask=None, task_covariates=None) -> "GaussianData":
        """Validate and broadcast user data (NumPy in, checked before anything is compiled).

        ``noise_sd`` broadcasts against ``obs`` ``(T, N, D)`` (e.g. ``(D,)`` shared, ``(T, 1, D)``
        per task).  ``mask`` may be boolean or hold only 0 and 1 (any numeric dtype); padded
        entries (``mask`` False) may hold anything, NaN included, and are replaced by finite values.
        """
        obs = real_array(obs, "obs")
        if obs.ndim != 3:
            raise ValueError(f"obs must have shape (tasks, observations, dims), got {obs.shape}")
        mask = boolean_mask(mask, obs.shape[:2])
        noise = real_array(noise_sd, "noise_sd")
        try:
            noise = np.broadcast_to(noise, obs.shape)
        except ValueError:
            raise ValueError(
                f"noise_sd of shape {np.shape(noise_sd)} does not broadcast to obs {obs.shape}"
            ) from None
        # padding never reaches a density, but keep it finite so no NaN leaks into gradients
        obs = np.where(mask[..., None], obs, 0.0)
        noise = np.where(mask[..., None], noise, 1.0)
        if task_covariates is not None:
            task_covariates = np.asarray(task_covariates, dtype=float)
        data = cls(obs=obs, noise_sd=noise, mask=mask, inputs=inputs, task_covariates=task_covariates)
        _check_gaussian(data, "data")
        return cls(
            obs=jnp.asarray(obs),
            noise_sd=jnp.asarray(noise),
            mask=jnp.asarray(mask),
            inputs=jax.tree_util.tree_map(jnp.asarray, inputs),
            task_covariates=None if task_covariates is None else jnp.asarray(task_covariates),
        )

    @classmethod
    def from_design(cls, obs, design, noise_sd, mask=None, task_covariates=None) -> "GaussianData":
        """Data of a linear-Gaussian likelihood whose mean is ``design @ theta``, the design given
        once for every task, per task or per observation: ``design`` ``(D, P)``, ``(T, 1, D, P)`` or
        ``(T, N, D, P)`` is broadcast to the inputs ``(T, N, D, P)``; ``obs`` ``(T, N, D)``, known
        ``noise_sd`` broadcasting to it (e.g. ``(D,)`` or ``(T, 1, D)``), ``mask`` ``(T, N)`` (False:
        padding, for unequal numbers of observations), checked as :meth:`create` checks."""
        for name, value in (("obs", obs), ("design", design), ("noise_sd", noise_sd)):
            if np.iscomplexobj(value):
                raise ValueError(f"{name} is complex; the linear-Gaussian likelihood takes real data")
        obs = np.asarray(obs, dtype=float)
        if obs.ndim != 3:
            raise ValueError(f"obs must have shape (tasks, observations, dims), got {obs.shape}")
        design = np.asarray(design, dtype=float)
        if design.ndim < 2 or design.shape[-2] != obs.shape[2]:
            raise ValueError(f"design must end in (D, P) with D = {obs.shape[2]} observation dims, got {design.shape}")
        if not np.all(np.isfinite(design)):
            raise ValueError("design holds NaN or infinite values")
        try:
            design = np.broadcast_to(design, obs.shape[:2] + design.shape[-2:])
        except ValueError:
            raise ValueError(
                f"design of shape {design.shape} does not broadcast to tasks x observations {obs.shape[:2]}"
            ) from None
        return cls.create(obs, noise_sd, inputs=np.array(design), mask=mask, task_covariates=task_covariates)


def _check_gaussian(data: GaussianData, where: str) -> None:
    """Validate concrete Gaussian data over every task; raise ``ValueError`` naming the problem.

    Checked: shapes; a boolean mask (a directly built ``GaussianData`` with a 0/1 mask of another
    dtype is refused: :meth:`GaussianData.create` converts it); finite observed values (padded
    ``obs`` may hold NaN: the likelihood never reads it); finite positive noise everywhere
    (padding included: it reaches the gradients); every task observed; real, finite inputs; and
    that the squared standardised residuals cannot overflow the floating type JAX will compute in.
    """
    if not isinstance(data, GaussianData):
        raise ValueError(f"{where}: expected GaussianData, got {type(data).__name__}")
    obs, noise, mask = np.asarray(data.obs), np.asarray(data.noise_sd), np.asarray(data.mask)
    for name, arr in (("obs", obs), ("noise_sd", noise)):
        if np.iscomplexobj(arr) or not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{where}: {name} must hold real floating-point numbers, got dtype {arr.dtype}")
    if obs.ndim != 3:
        raise ValueError(f"{where}: obs must have shape (tasks, observations, dims), got {obs.shape}")
    T, N, D = obs.shape
    if T == 0:
        raise ValueError(f"{where} is empty: it holds no tasks")
    if N == 0 or D == 0:
        raise ValueError(f"{where} is empty: obs has shape {obs.shape}")
    if noise.shape != obs.shape:
        raise ValueError(f"{where}: noise_sd has shape {noise.shape}, obs has {obs.shape}")
    if mask.shape != (T, N):
        raise ValueError(f"{where}: mask has shape {mask.shape}, expected {(T, N)}")
    if mask.dtype != bool:
        raise ValueError(
            f"{where}: mask must be boolean (False marks padding), got dtype {mask.dtype}; "
            "GaussianData.create converts a 0/1 mask"
        )
    observed = np.broadcast_to(mask[..., None], obs.shape)
    bad = None if mask.all() and all_finite(obs) else ~np.isfinite(obs) & observed  # one pass when all is well
    if bad is not None and np.any(bad):
        tasks = np.flatnonzero(bad.any(axis=(1, 2)))
        raise ValueError(
            f"{where}: obs holds {int(bad.sum())} NaN or infinite observed value(s), in task(s) "
            f"{tasks[:10].tolist()}"
        )
    compact = distinct(noise)  # a noise sd shared by the tasks is checked once
    if not np.all(np.isfinite(compact) & (compact > 0)):
        bad = ~(np.isfinite(noise) & (noise > 0))
        tasks = np.flatnonzero(bad.any(axis=(1, 2)))
        padding = " (in padding too: it reaches the gradients; GaussianData.create fills it)"
        raise ValueError(
            f"{where}: noise_sd must be finite and > 0 everywhere{padding if np.any(bad & ~observed) else ''}; "
            f"{int(bad.sum())} value(s) are not, in task(s) {tasks[:10].tolist()}"
        )
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(
            f"{where}: task(s) {empty[:10].tolist()} hold no observations (every task needs one)"
        )
    for leaf in jax.tree_util.tree_leaves(data.inputs):
        leaf = np.asarray(leaf)
        if leaf.shape[:2] != (T, N):
            raise ValueError(f"{where}: inputs leaves must have leading shape {(T, N)}, got {leaf.shape}")
        if np.iscomplexobj(leaf):
            raise ValueError(f"{where}: inputs are complex; hiermeta's Gaussian likelihood takes real data")
        if np.issubdtype(leaf.dtype, np.floating) and not all_finite(leaf):
            raise ValueError(f"{where}: inputs hold NaN or infinite values")
    check_task_covariates(getattr(data, "task_covariates", None), T, where)
    _check_overflow(obs, noise, observed, where)


def _check_overflow(obs, noise, observed, where: str) -> None:
    """Refuse data whose Gaussian log-likelihood overflows the floating type JAX computes in.

    The loss of a task is ``1/2 sum ((x - mu) / xi)^2`` and its curvature ``1/xi^2``; with
    ``mu`` near 0 (a fresh phi) the first is about ``1/2 sum (x / xi)^2``.  Both must stay well
    inside the type's range (float32 unless x64 is enabled), else the loss is infinite and the
    failure would look like a diverging inner loop.
    """
    dtype = jax.dtypes.canonicalize_dtype(obs.dtype)
    finfo = np.finfo(dtype)
    largest, ratio, smallest = 0.0, 0.0, np.inf
    step = max(1, (1 << 16) // max(1, obs.shape[1] * obs.shape[2]))  # tasks per block: temporaries stay small
    for lo in range(0, obs.shape[0], step):
        keep = observed[lo:lo + step]
        x = np.abs(np.where(keep, obs[lo:lo + step], 0.0)).astype(np.float64)
        xi = np.where(keep, noise[lo:lo + step], np.inf).astype(np.float64)
        largest, ratio, smallest = max(largest, x.max()), max(ratio, np.max(x / xi)), min(smallest, xi.min())
    precision = "float32 (enable float64 with jax.config.update('jax_enable_x64', True), or rescale the data)"
    if dtype != np.float32:
        precision = f"{dtype} (rescale the data)"
    if largest > finfo.max:
        raise ValueError(f"{where}: obs values up to {largest:.3g} overflow {precision}")
    limit = float(finfo.max) * 1e-3  # headroom for sums over observations and tasks
    per_task = obs.shape[1] * obs.shape[2]
    z = float(ratio)
    if z * z * per_task > limit:
        raise ValueError(
            f"{where}: |obs| / noise_sd reaches {z:.3g}; the squared residuals of the "
            f"log-likelihood overflow {precision}"
        )
    if float(smallest) ** -2 * per_task > limit:
        raise ValueError(
            f"{where}: noise_sd as small as {smallest:.3g} makes 1 / noise_sd^2 overflow {precision}"
        )


class GaussianLikelihood:
    """``x_{t,n} ~ N(mean_fn(theta_t, inputs_t)_n, diag(sd_{t,n}^2))``, the noise known or learned.

    ``mean_fn(theta_t, inputs_t)`` sees one task: ``theta_t`` the parameter pytree of that task
    and ``inputs_t`` its inputs (leading axis ``N``, or None); it returns the mean ``(N, D)`` or a
    mean ``(D,)`` shared by the task's observations.  It is vmapped over tasks here.  With
    ``globals`` (name -> :class:`~hiermeta.GlobalParam`, e.g. unpooled coefficients) it is called
    ``mean_fn(theta_t, inputs_t, g)`` with ``g`` the dict of their values.

    Args:
      noise: ``"known"``: ``sd = data.noise_sd``; ``"learned"``: ``sd = noise_sd * data.noise_sd``
        with ``noise_sd`` a global parameter of shape ``noise_shape`` (``()`` one sd for every
        observation dim, ``(D,)`` one per dim), ``data.noise_sd`` then being known relative scales.
      noise_prior: the noise sd's prior under NUTS (default flat; see :func:`hiermeta.with_priors`).
      noise_init: the noise sd's starting value for learners and type-II ML (default 1).
    """

    def __init__(
        self,
        mean_fn: Callable[..., jax.Array],
        site: str = "obs",
        *,
        noise: str = "known",
        noise_shape: tuple = (),
        noise_prior=None,
        noise_init=None,
        globals: Optional[Mapping[str, GlobalParam]] = None,
    ):
        if noise not in ("known", "learned"):
            raise ValueError(f"noise must be 'known' or 'learned', got {noise!r}")
        self.mean_fn = mean_fn
        self.site = site
        self.noise = noise
        declared = dict(globals or {})
        if noise == "learned":
            if "noise_sd" in declared:
                raise ValueError("'noise_sd' is the learned noise's site; give other names to globals")
            declared["noise_sd"] = GlobalParam(tuple(noise_shape), constraints.positive, noise_prior, noise_init)
        self.global_params = declared
        self._mean_globals = tuple(name for name in declared if name != "noise_sd")

    def mean(self, theta, data: GaussianData, g: Optional[Mapping[str, Any]] = None) -> jax.Array:
        if self._mean_globals:
            shared = {name: g[name] for name in self._mean_globals}
            mean_fn = lambda th, x: self.mean_fn(th, x, shared)
        else:
            mean_fn = self.mean_fn
        if data.noise_sd.shape[0] == 1:  # one task (the per-task densities): no size-1 batch axis in XLA
            one = lambda tree: jax.tree_util.tree_map(lambda a: a[0], tree)
            mu = mean_fn(one(theta), one(data.inputs))[None]
        else:
            mu = jax.vmap(mean_fn)(theta, data.inputs)
        if mu.ndim == 2:
            mu = mu[:, None, :]
        return jnp.broadcast_to(mu, data.noise_sd.shape)  # obs may be None (prior predictive)

    def sd(self, data: GaussianData, g: Optional[Mapping[str, Any]] = None) -> jax.Array:
        """Observation sd ``(T, N, D)``: the known one, or the learned one times the relative scales."""
        if self.noise == "learned":
            return data.noise_sd * g["noise_sd"]
        return data.noise_sd

    def __call__(self, theta, data: GaussianData, g: Optional[Mapping[str, Any]] = None) -> None:
        mu = self.mean(theta, data, g)
        fn = dist.Normal(mu, self.sd(data, g)).mask(data.mask[..., None]).to_event(2)
        numpyro.sample(self.site, fn, obs=data.obs)

    def num_observations(self, data: GaussianData) -> jax.Array:
        return jnp.sum(data.mask, axis=-1)

    def log_normaliser(self, data: GaussianData) -> jax.Array:
        """``-sum_{n,d} (log xi + log(2 pi) / 2)`` with ``xi = data.noise_sd`` (the known sd, or the
        known relative scale with learned noise): loss = 1/2 sum (x - mu)^2 / sd^2 (+ sum log noise_sd)."""
        per_obs = jnp.log(data.noise_sd) + 0.5 * jnp.log(2 * jnp.pi)
        return -jnp.sum(jnp.where(data.mask[..., None], per_obs, 0.0), axis=(-2, -1))

    def check(self, data: GaussianData, where: str) -> None:
        _check_gaussian(data, where)


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


class GroupedStatistics(NamedTuple):
    """Sufficient statistics of groups of tasks that share their design statistics (:func:`group_statistics`).

    Tasks t whose ``ZZ`` and ``ZX`` are equal (the same design, noise weights and observed rows:
    a balanced design) form a group u; what differs between them is the per-task vector
    ``x_t = [Zy_t (G P, noise group major), z_t (Q), 1]`` and sums.  Leading axis ``U``:

    Attributes:
      ZZ ``(U, G, P, P)``, ZX ``(U, G, P, K)`` or None: the group's shared statistics;
      moments ``(U, d, d)``: ``sum_t x_t x_t^T`` over its tasks (``d = G P + Q + 1``; the last
      diagonal entry is the number of tasks); yy ``(U, G)``, count ``(U, G)``, log_det_known
      ``(U,)``, XX ``(U, G, K, K)``, Xy ``(U, G, K)``: sums over its tasks.
    """

    ZZ: Any
    moments: Any
    yy: Any
    count: Any
    log_det_known: Any
    ZX: Any = None
    XX: Any = None
    Xy: Any = None


def _design_groups(rows: np.ndarray):
    """``(first, inverse)``: one task of each distinct row of ``rows`` ``(T, k)`` and every task's group.

    Every row equal to the first (a balanced design) is checked first; else rows are sorted by one
    random projection and checked exactly against their group's first row; a collision (never
    seen) falls back to an exact sort of the rows."""
    T = rows.shape[0]
    step = max(1, (1 << 22) // max(1, rows.shape[1]))
    if all(np.array_equal(rows[lo:lo + step], np.broadcast_to(rows[0], rows[lo:lo + step].shape))
           for lo in range(0, T, step)):
        return np.zeros(1, int), np.zeros(T, int)
    projection = rows @ np.random.default_rng(0).standard_normal(rows.shape[1])
    _, first, inverse = np.unique(projection, return_index=True, return_inverse=True)
    for lo in range(0, T, step):
        if not np.array_equal(rows[lo:lo + step], rows[first[inverse[lo:lo + step]]]):
            _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
            return first, inverse.reshape(-1)
    return first, inverse


def group_statistics(stats: LinearGaussianStatistics, force: bool = False) -> Optional[GroupedStatistics]:
    """Per-task statistics (NumPy, leading task axis) summed over the groups of tasks with equal ``ZZ``
    and ``ZX`` (:class:`GroupedStatistics`); None when the groups would not hold fewer numbers than the
    tasks (unless ``force``).  Exact: :meth:`LinearGaussianLikelihood.log_marginal_from_groups` of a
    group is the sum of its tasks' log marginals (to rounding)."""
    ZZ = np.asarray(stats.ZZ)
    T, G, P = ZZ.shape[:3]
    ZX = None if stats.ZX is None else np.asarray(stats.ZX)
    rows = ZZ.reshape(T, -1) if ZX is None else np.concatenate([ZZ.reshape(T, -1), ZX.reshape(T, -1)], axis=1)
    first, inverse = _design_groups(rows)
    U = first.shape[0]
    z = None if stats.task_covariates is None else np.asarray(stats.task_covariates, float)
    Q = 0 if z is None else z.shape[1]
    d = G * P + Q + 1
    per_task = sum(int(np.prod(np.shape(a)[1:])) for a in stats if a is not None)
    per_group = rows.shape[1] + d * d + 2 * G + 1 + (0 if ZX is None else int(np.prod(stats.XX.shape[1:])) + G * ZX.shape[-1])
    if not force and U * per_group >= T * per_task:
        return None
    summed = scipy.sparse.csr_matrix((np.ones(T), (inverse, np.arange(T))), shape=(U, T))
    total = lambda a: None if a is None else (summed @ np.asarray(a, float).reshape(T, -1)).reshape((U,) + np.shape(a)[1:])
    moments = np.zeros((U, d, d))
    step = max(1, (1 << 22) // (d * d))
    for lo in range(0, T, step):
        x = np.concatenate([np.asarray(stats.Zy[lo:lo + step], float).reshape(-1, G * P)]
                           + ([] if z is None else [z[lo:lo + step]]) + [np.ones((min(step, T - lo), 1))], axis=1)
        moments += (summed[:, lo:lo + step] @ np.einsum("ti,tj->tij", x, x).reshape(x.shape[0], -1)).reshape(U, d, d)
    return GroupedStatistics(ZZ=ZZ[first], moments=moments, yy=total(stats.yy), count=total(stats.count),
                             log_det_known=total(stats.log_det_known), ZX=None if ZX is None else ZX[first],
                             XX=total(stats.XX), Xy=total(stats.Xy))


def _check_columns(Z, P: int) -> None:
    """At trace time, before XLA sees the shapes: the design of theta has P columns."""
    if np.shape(Z)[-1] != P:
        raise ValueError(f"the design has P = {np.shape(Z)[-1]} columns but the model has P = {P} parameters")


class PooledMoments(NamedTuple):
    """``[A y]^T W [A y]`` over every observed scalar of every task, ``A = [Z, z_t (x) Z, X]`` the pooled
    design (task covariates times the design, then the fixed effects) and ``y = x - offset``:
    ``weighted`` with the data's known weights ``1 / noise_sd^2``, ``unweighted``; ``count`` the
    observed scalars.  Sums: chunks of tasks add up."""

    weighted: Any
    unweighted: Any
    count: Any


def _sum_log_squares(sd):
    """``sum log sd^2`` over all but the leading axis of positive ``sd``, with one logarithm per 512
    values instead of one each: ``sd = m 2^k`` (``frexp``, ``m`` in [0.5, 1)), so the sum is
    ``2 (sum log prod m + log 2 sum k)``, products over blocks of 512 mantissas (>= 2^-512: no underflow)."""
    mantissa, exponent = jnp.frexp(sd.reshape(sd.shape[0], -1))
    n = mantissa.shape[1]
    blocks = -(-n // 512)
    mantissa = jnp.pad(mantissa, [(0, 0), (0, blocks * 512 - n)], constant_values=1.0)
    log_mantissa = jnp.sum(jnp.log(jnp.prod(mantissa.reshape(-1, blocks, 512), axis=2)), axis=1)
    return 2.0 * (log_mantissa + jnp.log(2.0) * jnp.sum(exponent, axis=1))


def _num_random(k: int, K: int, Q: int) -> int:
    """P from the number of pooled columns ``k = P (1 + Q) + K``."""
    return (k - K) // (1 + Q)


def _real(name: str, value) -> np.ndarray:
    """``value`` as float64, refusing text (which NumPy would parse) and complex numbers (whose
    imaginary part it would drop)."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    return arr.astype(float)


def _pooled_cross_products(stats: LinearGaussianStatistics, e, K: int):
    """``sum_t [e_t (x) Z, X, y]^T W0 [e_t (x) Z, X, y]`` from per-task statistics (noise groups summed)."""
    T, _, P, _ = stats.ZZ.shape
    a = e.shape[1]
    ZZ, Zy, yy = jnp.sum(stats.ZZ, 1), jnp.sum(stats.Zy, 1), jnp.sum(stats.yy, 1)
    top = [jnp.einsum("ta,tb,tpq->apbq", e, e, ZZ).reshape(a * P, a * P)]
    right = [jnp.einsum("ta,tp->ap", e, Zy).reshape(a * P, 1)]
    rows = []
    if K:
        ZX, XX, Xy = jnp.sum(stats.ZX, 1), jnp.sum(stats.XX, 1), jnp.sum(stats.Xy, 1)
        cross = jnp.einsum("ta,tpk->apk", e, ZX).reshape(a * P, K)
        top.append(cross)
        rows.append(jnp.concatenate([cross.T, jnp.sum(XX, 0), jnp.sum(Xy, 0)[:, None]], axis=1))
        right = [jnp.concatenate([right[0], jnp.sum(Xy, 0)[:, None]], axis=0)]
    design = jnp.concatenate([jnp.concatenate(top, axis=1)] + [r[:, :-1] for r in rows], axis=0)
    column = right[0]
    return jnp.block([[design, column], [column.T, jnp.sum(yy).reshape(1, 1)]])


@functools.lru_cache(maxsize=32)
def _compiled_moments(likelihood):
    return jax.jit(likelihood.pooled_moments)


class LinearGaussianLikelihood(GaussianLikelihood):
    """``x = Z theta + X beta + offset + noise``, with closed-form marginal likelihood and posterior.

    ``num_fixed = K > 0`` adds the global parameter ``beta`` ``(K,)`` (unpooled fixed effects, a
    flat prior unless one is given); ``noise="learned"`` the global ``noise_sd``.  Task data is a
    :class:`~hiermeta.GaussianData` whose ``inputs`` is a :class:`LinearDesign` (or the ``Z`` array).
    It is also the Gaussian family of :mod:`hiermeta.families` (``name``, ``discrete``, ``binary``).
    """

    name = "gaussian"
    discrete = False
    binary = False
    takes_trials = False

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
        return linear_predictor(design, theta, g["beta"] if self.num_fixed else None)

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

    def pooled_moments(self, data: GaussianData, task_covariates=None, statistics=None) -> PooledMoments:
        """The cross-products of the pooled design and the response over every observed scalar
        (:class:`PooledMoments`; jittable), from which :meth:`start_from_moments` fits the pooled model.

        A pooled row is ``[e_t (x) Z_n, X_n, y_n]`` with ``e_t = [1, z_t]``.  Weighted: sums over tasks
        of the per-task statistics (``statistics``, computed when not given),
        ``sum_t (e_t e_t^T) (x) Z_t^T W Z_t`` and the like, O(((1 + Q) P + K)^2) per task.  Unweighted:
        the same when every observed ``noise_sd`` is 1, else one matrix product over the rows."""
        weighted = self.sufficient_statistics(data, task_covariates) if statistics is None else statistics
        e = jnp.ones((weighted.ZZ.shape[0], 1), weighted.ZZ.dtype)
        if task_covariates is not None:
            e = jnp.concatenate([e, jnp.asarray(task_covariates, e.dtype)], axis=1)
        pooled = _pooled_cross_products(weighted, e, self.num_fixed)
        observed = jnp.broadcast_to(data.mask[..., None], data.obs.shape)
        unit = jnp.all(jnp.where(observed, data.noise_sd == 1.0, True))
        unweighted = jax.lax.cond(unit, lambda: pooled, lambda: self._pooled_rows(data, e, observed))
        return PooledMoments(pooled, unweighted, jnp.sum(weighted.count))

    def _pooled_rows(self, data: GaussianData, e, observed):
        """``A^T A`` over every observed row of ``A = [e_t (x) Z, X, y]`` (unweighted)."""
        design = _design(data.inputs)
        Z = design.random
        columns = [(e[:, None, None, :, None] * Z[..., None, :]).reshape(Z.shape[:3] + (-1,))]
        if self.num_fixed:
            columns.append(design.fixed)
        columns.append((data.obs - (0.0 if design.offset is None else design.offset))[..., None])
        A = jnp.where(observed[..., None], jnp.concatenate(columns, axis=-1), 0.0).reshape(-1, sum(
            c.shape[-1] for c in columns))
        return A.T @ A

    def start_from_moments(self, moments: PooledMoments, model=None) -> dict:
        """Starting values on the data's own scale from :meth:`pooled_moments` (summed over any chunks).

        The pooled weighted least-squares fit of ``x - offset ~ Z phi + X beta (+ Z z_t gamma)``
        (weights ``1 / noise_sd^2`` of the data: the known sd, or the relative scales of a learned
        one; the minimum-norm solution when the design is rank deficient) gives phi, beta, gamma;
        ``s`` is the residual rms, weighted when the noise is learned (then it is the noise sd's
        start), unweighted for known noise; each module's sigma starts at ``s / rms(Z_p)``
        averaged over its coordinates: the size of a coordinate's effect that moves the response by
        one residual sd.  Host NumPy on a few numbers.
        """
        weighted, unweighted = np.asarray(moments.weighted, float), np.asarray(moments.unweighted, float)
        n, k = float(moments.count), weighted.shape[0] - 1
        coef = min_norm_solve(weighted[:k, :k], weighted[:k, k])
        full = np.append(coef, -1.0)  # residual = [A y] @ full

        def rms(cross):
            value = float(np.sqrt(max(full @ cross @ full, 0.0) / n))
            return value if np.isfinite(value) and value > 0 else 1.0

        P = _num_random(k, self.num_fixed, 0 if model is None else int(model.num_task_covariates))
        Q = (k - self.num_fixed - P) // P
        out = {"phi": coef[:P]}
        if Q:
            out["gamma"] = coef[P:P + Q * P].reshape(Q, P)
        if self.num_fixed:
            out["beta"] = coef[k - self.num_fixed:k]
        scale = rms(weighted) if self.noise == "learned" else rms(unweighted)
        if self.noise == "learned":
            out["noise_sd"] = np.full(tuple(self.global_params["noise_sd"].shape), scale)
        if model is not None:
            column_rms = np.sqrt(np.diag(unweighted)[:P] / n)
            out["sigma"] = module_mean(model, scale / np.where(column_rms > 0, column_rms, 1.0))
        return out

    def initial_values(self, data: GaussianData, model=None) -> dict:
        """Starting values on the data's own scale (for type-II ML and the learners):
        :meth:`start_from_moments` of the data's :meth:`pooled_moments`."""
        z = None if model is None or not model.num_task_covariates else model.task_covariates(data)
        return self.start_from_moments(_compiled_moments(self)(data, z), model)

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
        m = jnp.broadcast_to(prior_mean, (Z.shape[0], Z.shape[-1]))[:, None, None, :]
        mean = linear_predictor(design, m, g["beta"] if self.num_fixed else None)
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
        (module docstring).  Jittable; padding (``mask`` False) counts nowhere.

        Each sum is one batched matrix product per task of the rows scaled by ``sqrt(W0)``,
        ``(W0^1/2 Z)^T (W0^1/2 Z)``, over the scalars of each noise group (gathered by a static index)."""
        design = _design(data.inputs)
        groups = self.noise_groups(data.obs.shape[1:])
        if groups is None:
            raise ValueError(
                f"a learned noise sd of shape {tuple(self.global_params['noise_sd'].shape)} does not broadcast to "
                f"one task's observations {tuple(data.obs.shape[1:])}: no per-task sufficient statistics"
            )
        T = data.obs.shape[0]
        observed = jnp.broadcast_to(data.mask[..., None], data.obs.shape)
        root_w = jnp.where(observed, 1.0 / jnp.where(observed, data.noise_sd, 1.0), 0.0)
        y = data.obs - (0.0 if design.offset is None else design.offset)
        # rows (T, n, ...) over the task's scalars, then (T, G, n_g, ...) gathered by noise group; a
        # group with fewer scalars than the largest is padded with an appended zero row
        flat = groups.reshape(-1)
        G = int(flat.max()) + 1
        sizes = np.bincount(flat, minlength=G)
        order = np.argsort(flat, kind="stable")
        index = np.full((G, int(sizes.max())), flat.size)
        index[flat[order], np.arange(flat.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)] = order

        def by_group(a, scale=True):  # (T, N, D, ...) -> (T, G, n_g, ...), scaled by sqrt(W0)
            if scale:
                a = a * root_w.reshape(root_w.shape + (1,) * (a.ndim - 3))
            a = a.reshape((T, flat.size) + a.shape[3:])
            if G == 1:
                return a[:, None]
            a = jnp.concatenate([a, jnp.zeros((T, 1) + a.shape[2:], a.dtype)], axis=1)
            return a[:, index]

        Zw, yw = by_group(design.random), by_group(jnp.where(observed, y, 0.0))
        out = dict(
            ZZ=jnp.einsum("tgnp,tgnq->tgpq", Zw, Zw),
            Zy=jnp.einsum("tgnp,tgn->tgp", Zw, yw),
            yy=jnp.sum(yw * yw, axis=-1),
            count=jnp.sum(by_group(observed.astype(yw.dtype), scale=False), axis=-1),
            log_det_known=_sum_log_squares(jnp.where(observed, data.noise_sd, 1.0)),
            task_covariates=task_covariates,
        )
        if self.num_fixed:
            Xw = by_group(design.fixed)
            out.update(ZX=jnp.einsum("tgnp,tgnk->tgpk", Zw, Xw), XX=jnp.einsum("tgnk,tgnl->tgkl", Xw, Xw),
                       Xy=jnp.einsum("tgnk,tgn->tgk", Xw, yw))
        return LinearGaussianStatistics(**out)

    def log_marginal_from_statistics(self, stats: LinearGaussianStatistics, prior_mean, prior_scale_tril,
                                     g: Optional[Mapping] = None):
        """:meth:`log_marginal` from :meth:`sufficient_statistics` instead of the observations: the same
        value (to rounding), O(P^2 + K^2) per task."""
        inv, log_s2 = self._noise_weights(stats.count.shape[-1], g)
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

    def _noise_weights(self, G: int, g):
        """``(1 / s_g^2, log s_g^2)`` ``(G,)`` of the noise groups (1 and 0 for known noise)."""
        if self.noise != "learned":
            return jnp.ones(G), jnp.zeros(G)
        s2 = jnp.reshape(jnp.asarray(g["noise_sd"]) ** 2, (-1,))
        return jnp.broadcast_to(1.0 / s2, (G,)), jnp.broadcast_to(jnp.log(s2), (G,))

    def log_marginal_from_groups(self, groups: "GroupedStatistics", mean_at_zero, mean_slope, prior_scale_tril,
                                 g: Optional[Mapping] = None):
        """``sum_{t in u} log p(D_t | ...)`` per group ``u`` ``(U,)`` of :func:`group_statistics`: the sum
        of :meth:`log_marginal_from_statistics` over the group's tasks, O(P^3 + d^2 P) per group
        whatever its number of tasks.

        The prior mean is affine in the task covariates, ``m_t = mean_at_zero + z_t mean_slope``
        (``(P,)``, ``(Q, P)`` or None), so ``m_t = D x_t`` with ``x_t = [Zy_t, z_t, 1]`` and
        ``D = [0, mean_slope^T, mean_at_zero]``.  With ``E x_t = sum_g Zy_{t,g} / s_g^2``,
        ``h = sum_g ZX_g beta / s_g^2`` and ``e`` the last unit vector, every term of a task's log
        marginal that depends on its data is a quadratic form in ``x_t``:

            b_t = C x_t,   C = E - F D - h e^T,
            r^T W r = yy_t - 2 Xy_t . beta + beta^T XX_t beta + x_t^T Q x_t,
            Q = D^T F D - (D^T E + E^T D) + D^T h e^T + e h^T D,

        so the group needs only ``M_u = sum_t x_t x_t^T``: ``sum_t b_t^T L B^-1 L^T b_t =
        tr(B^-1 L^T C M_u C^T L)`` and ``sum_t x_t^T Q x_t = tr(Q M_u)``.
        """
        inv, log_s2 = self._noise_weights(groups.count.shape[-1], g)
        G, P = groups.ZZ.shape[1], groups.ZZ.shape[-1]
        M = groups.moments
        d = M.shape[-1]
        slope = jnp.zeros((d - G * P - 1, P), M.dtype) if mean_slope is None else jnp.asarray(mean_slope)
        D = jnp.concatenate([jnp.zeros((P, G * P), M.dtype), slope.T, jnp.asarray(mean_at_zero)[:, None]], axis=1)
        E = jnp.concatenate([jnp.kron(inv[None, :], jnp.eye(P, dtype=M.dtype)), jnp.zeros((P, d - G * P), M.dtype)],
                            axis=1)
        F = jnp.einsum("ugpq,g->upq", groups.ZZ, inv)
        FD = jnp.einsum("upq,qd->upd", F, D)
        D_E = D.T @ E
        Q = jnp.einsum("pd,upe->ude", D, FD) - (D_E + D_E.T)
        C = E - FD
        quad = jnp.einsum("gu,g->u", groups.yy.T, inv)
        if self.num_fixed:
            beta = g["beta"]
            h = jnp.einsum("ugpk,g,k->up", groups.ZX, inv, beta)
            hD = h @ D  # (U, d)
            Q = Q.at[:, :, -1].add(hD).at[:, -1, :].add(hD)
            C = C.at[:, :, -1].add(-h)
            quad = quad - 2.0 * jnp.einsum("ugk,g,k->u", groups.Xy, inv, beta) + jnp.einsum(
                "ugkl,g,k,l->u", groups.XX, inv, beta, beta)
        quad = quad + jnp.einsum("ude,ued->u", Q, M)
        L = jnp.asarray(prior_scale_tril)
        LC = jnp.einsum("pi,upd->uid", L, C)  # L^T C
        B = jnp.eye(P) + jnp.einsum("pi,upq,qj->uij", L, F, L)
        c_B_c, log_det_B = trace_solve_logdet(B, jnp.einsum("uid,ude,uje->uij", LC, M, LC))
        tasks = M[:, -1, -1]
        log_det_noise = groups.log_det_known + groups.count @ log_s2
        n = jnp.sum(groups.count, -1)
        return -0.5 * (quad - c_B_c + tasks * log_det_B + log_det_noise + n * jnp.log(2.0 * jnp.pi))

    @staticmethod
    def _log_marginal_core(F, b, quad, log_det_noise, n, prior_scale_tril):
        """The log marginal from ``F``, ``b``, ``r^T W r``, ``sum log sd^2`` and ``n`` (module docstring)."""
        L = jnp.asarray(prior_scale_tril)
        B = jnp.eye(L.shape[0]) + jnp.einsum("pi,tpq,qj->tij", L, F, L)
        c_B_c, log_det_B = quad_logdet(B, b @ L)  # c = L^T b per task
        return -0.5 * (quad - c_B_c + log_det_B + log_det_noise + n * jnp.log(2.0 * jnp.pi))

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

    def posterior_from_precision(self, data: GaussianData, prior_mean, prior_precision, g: Optional[Mapping] = None):
        """:meth:`posterior` for a diagonal prior given by its precisions ``(P,)``, which may be 0 (a
        flat prior on that coordinate; all 0 gives the MLE): ``theta_t | D_t ~ N(m_t + Lambda^-1 b_t,
        Lambda^-1)``, ``Lambda = diag(prior_precision) + F_t`` (the precision form; :meth:`posterior`'s
        Woodbury form takes a prior sd of 0 instead)."""
        F, b, _, _, _ = self._sufficient(data, prior_mean, g)
        cov = jnp.linalg.inv(F + jnp.diag(jnp.broadcast_to(jnp.asarray(prior_precision), b.shape[-1:])))
        cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
        return jnp.broadcast_to(prior_mean, b.shape) + jnp.einsum("tpq,tq->tp", cov, b), cov

    def predictive(self, support: GaussianData, query: GaussianData, prior_mean, prior_scale_tril,
                   g: Optional[Mapping] = None):
        """The exact predictive of each task's query data given its support at fixed hyperparameters.

        Returns ``(log_pred (T,), log_evidence (T,), mean (T, N, D), sd (T, N, D))``: the joint
        ``log p(D^val_t | D^tr_t) = log p(D^tr_t, D^val_t) - log p(D^tr_t)`` (the support and query
        observations of a task merged), the support's log marginal, and the marginal predictive mean
        and sd of every query scalar, ``Z mu_t + X beta + offset`` and
        ``sqrt(diag(Z V_t Z^T) + sd^2)`` with ``N(mu_t, V_t)`` the posterior given the support."""
        both = merge_splits(TaskBatch(support, query))
        log_evidence = self.log_marginal(support, prior_mean, prior_scale_tril, g)
        log_pred = self.log_marginal(both, prior_mean, prior_scale_tril, g) - log_evidence
        mu, V = self.posterior(support, prior_mean, prior_scale_tril, g)
        Z = _design(query.inputs).random
        mean = self.mean(mu, query, g)
        var = jnp.einsum("tndp,tpq,tndq->tnd", Z, V, Z) + self.sd(query, g) ** 2
        return log_pred, log_evidence, mean, jnp.sqrt(var)


def linear_gaussian(**kwargs) -> LinearGaussianLikelihood:
    """:class:`LinearGaussianLikelihood` (``noise="known" | "learned"``, ``num_fixed=K``, ...)."""
    return LinearGaussianLikelihood(**kwargs)
