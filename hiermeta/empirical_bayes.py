"""Empirical Bayes (type-II maximum likelihood): exact where the marginal likelihood is closed form,
by the Laplace approximation or adaptive Gauss-Hermite quadrature for any other likelihood.

    (phi_hat, sigma_hat, ...) = argmax sum_t log p(D_t | phi, sigma, C, gamma, g)      (ML)

over every hyperparameter of the model (phi, the module scales sigma, the correlation of each
correlated block, the group-level coefficients gamma and the likelihood's global parameters g,
e.g. the noise sd and unpooled fixed effects beta), each task's theta integrated out.  With
``method="REML"`` the parameters that enter the mean linearly (phi, gamma, beta: the *fixed
effects*) are integrated out too, under a flat prior, as lme4 and statsmodels do by default:

    log L_REML(v) = log L_ML(psi_hat(v), v) + k/2 log(2 pi) - 1/2 log|H_psi(v)|,

``v`` the variance parameters, ``psi`` the ``k`` fixed effects and ``H_psi = -d^2 log L_ML / d psi^2``
(exact: ``log L_ML`` is quadratic in psi for a linear-Gaussian likelihood).  REML is defined here
only for that exact case.

Each task's ``log p(D_t | ...)`` is, by ``approximation``: ``"exact"`` (the likelihood's closed-form
``log_marginal``, a linear-Gaussian likelihood), ``"laplace"`` or ``"agq"`` (adaptive
Gauss-Hermite quadrature with ``num_nodes`` nodes, one scalar random effect), both from
:mod:`hiermeta.laplace` (a Newton solve of each task's mode, differentiated implicitly);
``"auto"`` is exact where available, else Laplace (``"agq"`` when ``num_nodes > 1`` is given).

For an exact linear-Gaussian likelihood the data are read once (:func:`task_statistics`): each
task's sufficient statistics, the pooled cross-products that give the starting values
(:meth:`~hiermeta.LinearGaussianLikelihood.start_from_moments`), and, where tasks share their design
statistics (a balanced design), their sums over each group of such tasks
(:func:`~hiermeta.linear_gaussian.group_statistics`): an evaluation of the objective then costs
O(P^3) per distinct design, not per task, and the boundary check (every sigma set to 0 in turn)
is one compiled call.  Starting values and their checks: :mod:`hiermeta.starts`.

Optimised in the unconstrained space (log sigma, NumPyro's bijections for the other sites) by
L-BFGS-B (SciPy, driving one jitted value-and-gradient per model, compiled once and reused across
calls) until the largest gradient component of the mean objective per task is below ``tol``.
Use float64 (``jax_enable_x64``).

Why SciPy and not ``optax.lbfgs`` under ``lax.while_loop``: on jaxlib 0.10 (CPU) that compiled
loop intermittently deadlocks XLA's thread pool on large task sets (seen with 10,000 tasks, with
and without ``--xla_cpu_multi_thread_eigen=false``); a host-driven loop of plain jitted calls
does not, and SciPy already ships with JAX.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from jax.flatten_util import ravel_pytree

from .errors import EmpiricalBayesWarning
from .hierarchy import HierarchicalModel
from .laplace import approximate_log_marginal, check_approximation, compiled_marginal_info
from .linear_gaussian import GroupedStatistics, group_statistics
from .mixed.optimize import blas_threads
from .tasks import distinct, num_tasks
from .sites import constrain, unconstrain
from .starts import check_values, data_start, start_values, unconstrained
from .utils import check_count, check_positive

__all__ = [
    "Type2MLResult",
    "EmpiricalBayesWarning",
    "type2_ml",
    "log_marginal_likelihood",
    "type2_maximum_likelihood",
    "task_statistics",
    "TaskStatistics",
    "uses_statistics",
]


class Type2MLResult(NamedTuple):
    """The type-II ML (or REML) estimate.

    Attributes:
      phi: ``(P,)``; sigma: ``(M,)``.
      log_marginal: the maximised objective, ``sum_t log p(D_t | ...)`` (the REML criterion for
        ``method="REML"``), comparable with lme4's / statsmodels' log-likelihood.
      num_iterations, grad_norm (max |gradient| of the mean objective per task, unconstrained
        coordinates), converged (``grad_norm <= tol`` and finite), message (SciPy's reason).
      extra: the other hyperparameter sites (``noise_sd``, ``beta``, ``gamma``, ``corr_chol_k``).
      method: ``"ML"`` or ``"REML"``.
      phi_se: standard errors of phi, ``sqrt(diag((X^T V^-1 X)^-1))`` at the estimate (the fixed
        effects' standard errors lme4 and statsmodels print), when the likelihood is linear-Gaussian.
      fixed_effects_se: the same for every fixed-effect site (phi, gamma, beta), site -> array.
      singular: what sits on a boundary: the modules whose sigma can be set to exactly 0 without
        lowering the objective by more than ``tol`` per task, and correlation sites with a
        correlation of +-1 (lme4's "boundary (singular) fit").
      approximation: ``"exact"``, ``"laplace"`` or ``"agq"``; num_nodes: quadrature nodes (1 for Laplace).
      not_positive_definite: tasks whose Laplace Hessian at the mode is not positive definite at
        the estimate (the approximation is not valid there; a warning says so).
      inner_converged: every task's Newton solve of its mode converged at the estimate (True for exact).
      fixed_effects_se: for ``"laplace"``/``"agq"`` from the inverse of the full observed information
        (every optimised parameter, sigma included; lme4's ``use.hessian = TRUE``), its Hessian by
        central differences of the exact gradient.
    """

    phi: np.ndarray
    sigma: np.ndarray
    log_marginal: float
    num_iterations: int
    grad_norm: float
    converged: bool
    message: str
    extra: dict = {}
    method: str = "ML"
    phi_se: Optional[np.ndarray] = None
    fixed_effects_se: dict = {}
    singular: tuple = ()
    approximation: str = "exact"
    num_nodes: int = 1
    not_positive_definite: tuple = ()
    inner_converged: bool = True

    def correlation(self, k: int = 0) -> np.ndarray:
        """The estimated correlation matrix of correlated block ``k`` (``C = L L^T``)."""
        L = np.asarray(self.extra[f"corr_chol_{k}"])
        return L @ L.T


# ---------------------------------------------------------------------------- marginal likelihood


def resolve_approximation(model: HierarchicalModel, approximation: str = "auto", num_nodes=None) -> tuple:
    """``(approximation, num_nodes)`` after ``"auto"`` and validation (``ValueError`` naming the problem)."""
    exact = callable(getattr(model.likelihood, "log_marginal", None))
    if approximation == "auto":
        approximation = "exact" if exact else ("agq" if num_nodes is not None and num_nodes > 1 else "laplace")
    if approximation == "exact":
        if not exact:
            raise ValueError(
                f"{type(model.likelihood).__name__} has no closed-form marginal likelihood (a log_marginal "
                "method); use approximation='laplace' or 'agq' (or a linear-Gaussian likelihood: "
                "hiermeta.linear_gaussian)"
            )
        if num_nodes not in (None, 1):
            raise ValueError(f"the exact marginal likelihood takes no quadrature nodes; got num_nodes={num_nodes}")
        return "exact", 1
    if approximation not in ("laplace", "agq"):
        raise ValueError(f"approximation must be 'auto', 'exact', 'laplace' or 'agq', got {approximation!r}")
    return approximation, check_approximation(approximation, num_nodes, model.partition.num_params)


def log_marginal_likelihood(model: HierarchicalModel, phi, sigma, data, extra=None, *,
                            approximation: str = "auto", num_nodes: Optional[int] = None) -> jax.Array:
    """``log p(D_t | phi, sigma, extra)`` per task ``(T,)``, each task's theta integrated out.

    ``approximation="exact"``: the closed form of a likelihood that provides ``log_marginal(data,
    prior_mean, prior_scale_tril, globals)`` (:class:`~hiermeta.linear_gaussian.LinearGaussianLikelihood`);
    ``"laplace"`` / ``"agq"`` (``num_nodes`` Gauss-Hermite nodes): :mod:`hiermeta.laplace`, for any
    likelihood; ``"auto"``: exact where available, else Laplace.  Jittable and differentiable.
    """
    approximation, num_nodes = resolve_approximation(model, approximation, num_nodes)
    if approximation != "exact":
        return approximate_log_marginal(model, phi, sigma, data, extra, approximation=approximation,
                                        num_nodes=num_nodes)
    lik = model.likelihood
    mean = model.prior_mean(phi, extra, model.task_covariates(data))
    L = model.prior_scale_tril(jnp.broadcast_to(sigma, (model.partition.num_modules,)), extra)
    return lik.log_marginal(data, mean, L, model.globals_of(extra))


def _fixed_effect_sites(model: HierarchicalModel) -> tuple:
    """Sites entering the mean linearly: phi, gamma (task covariates), and the likelihood's
    ``linear_globals`` (e.g. ``beta`` of a linear-Gaussian likelihood)."""
    names = ["phi"] + (["gamma"] if model.num_task_covariates else [])
    linear = getattr(model.likelihood, "linear_globals", ())
    return tuple(names + [n for n in model.global_params if n in linear])


DEFAULT_CHUNK_SIZE = 2048


class TaskStatistics(NamedTuple):
    """Every task's sufficient statistics in chunks of equal size (:func:`task_statistics`).

    ``stats``: the likelihood's statistics, each leaf ``(num_chunks, chunk_size, ...)``: per task
    (:class:`~hiermeta.LinearGaussianStatistics`), or per group of tasks that share their design
    (:class:`~hiermeta.linear_gaussian.GroupedStatistics`, when that holds fewer numbers);
    ``valid`` ``(num_chunks, chunk_size)``: False on the padding that fills the last chunk (those
    slots hold zero statistics and are never counted); ``moments``: the pooled design's
    cross-products over every task (:class:`~hiermeta.linear_gaussian.PooledMoments`), for the
    starting values.
    """

    stats: Any
    valid: Any
    moments: Any = None

    @property
    def num_tasks(self) -> int:
        if isinstance(self.stats, GroupedStatistics):
            tasks = np.asarray(self.stats.moments)[..., -1, -1]
            return int(np.rint(np.sum(np.where(np.asarray(self.valid), tasks, 0.0))))
        return int(np.sum(np.asarray(self.valid)))


def uses_statistics(model: HierarchicalModel, data, approximation: str = "exact") -> bool:
    """Whether type-II ML of ``model`` on ``data`` runs on per-task sufficient statistics: an exact
    marginal likelihood whose likelihood computes them (:class:`~hiermeta.linear_gaussian.LinearGaussianLikelihood`)."""
    lik = model.likelihood
    if approximation != "exact" or not all(callable(getattr(lik, name, None)) for name in
                                           ("sufficient_statistics", "log_marginal_from_statistics", "noise_groups")):
        return False
    return lik.noise_groups(tuple(np.shape(data.obs)[1:])) is not None


@functools.lru_cache(maxsize=32)
def _compiled_statistics(likelihood, shapes: tuple, treedef):
    """The statistics and pooled moments of one chunk, jitted: ``fn(mask, leaves)`` with the leaves of
    ``(data without its mask, z)``; ``shapes[i]`` is the full shape of leaf i when it arrives without
    its broadcast axes, None when it arrives whole."""

    def statistics_and_moments(mask, leaves):
        leaves = [a if shape is None else jnp.broadcast_to(a, shape) for a, shape in zip(leaves, shapes)]
        data, z = jax.tree_util.tree_unflatten(treedef, leaves)
        data = data._replace(mask=mask)
        stats = likelihood.sufficient_statistics(data, z)
        return stats, likelihood.pooled_moments(data, z, stats)

    return jax.jit(statistics_and_moments)


def _chunk_leaf(a: np.ndarray, lo: int, hi: int, size: int):
    """Tasks ``lo:hi`` of ``a`` padded (edge) to ``size``, without the axes along which ``a`` is a
    broadcast (stride 0, :func:`~hiermeta.tasks.distinct`): ``(piece, its full shape, or None when
    the piece is whole)``."""
    compact = distinct(a)
    shared = compact.shape[0] == 1 and a.shape[0] > 1  # the same for every task
    piece = compact if shared else compact[lo:hi]
    if not shared and piece.shape[0] < size:
        piece = np.pad(piece, [(0, size - piece.shape[0])] + [(0, 0)] * (a.ndim - 1), mode="edge")
    full = (size,) + a.shape[1:]
    return np.ascontiguousarray(piece), (None if piece.shape == full else full)


def _chunk_layout(T: int, chunk_size: Optional[int]) -> tuple:
    """``(C, num_chunks)``: all ``T`` in one chunk up to ``2 * DEFAULT_CHUNK_SIZE`` unless a chunk size is given."""
    C = T if chunk_size is None and T <= 2 * DEFAULT_CHUNK_SIZE else min(check_count(
        chunk_size or DEFAULT_CHUNK_SIZE, "chunk_size", 1), T)
    return C, -(-T // C)


def _in_chunks(arrays, T: int, chunk_size: Optional[int]):
    """NumPy ``arrays`` (leading axis ``T``) as ``(num_chunks, C, ...)``, the last chunk padded with
    zeros, and the ``valid`` mask ``(num_chunks, C)``."""
    C, n_chunks = _chunk_layout(T, chunk_size)
    pad = n_chunks * C - T
    split = lambda a: np.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape((n_chunks, C) + a.shape[1:])
    return jax.tree_util.tree_map(split, arrays), (np.arange(n_chunks * C) < T).reshape(n_chunks, C)


STATISTICS_CHUNK_BYTES = 1 << 23  # data per chunk of the statistics pass (8 MiB: its temporaries stay in cache)


def task_statistics(model: HierarchicalModel, data, chunk_size: Optional[int] = None,
                    group: bool = True) -> TaskStatistics:
    """The sufficient statistics of ``data``, computed chunk by chunk, with the pooled moments.

    The observations are read once, in chunks of ``chunk_size`` tasks (default: about 8 MiB of
    data per chunk, whose temporaries then stay in cache; one compiled program for every chunk, the last one padded with masked-out
    copies of its last task; the chunks are dispatched without waiting, so copying one overlaps
    computing another), so the memory of the computation is the statistics' plus a few chunks'
    of observations; the statistics hold O(P^2 + K^2) numbers per task whatever its number of
    observations.  With ``group`` the tasks that share their design statistics are summed into
    groups (:func:`~hiermeta.linear_gaussian.group_statistics`) when that holds fewer numbers (a
    balanced design: one group, and an objective whose cost does not grow with the number of
    tasks).  The result (per task or per group) is laid out in chunks of ``chunk_size`` (default:
    all in one up to 4096, else ``DEFAULT_CHUNK_SIZE``) for the objective's loop.
    """
    T = num_tasks(data)
    z = model.task_covariates(data)
    host = jax.tree_util.tree_map(np.asarray, (data, z))
    if chunk_size is None:
        per_task_bytes = sum(a[:1].nbytes for a in jax.tree_util.tree_leaves(host))
        S = int(min(T, max(1, STATISTICS_CHUNK_BYTES // max(1, per_task_bytes))))
    else:
        S = min(check_count(chunk_size, "chunk_size", 1), T)
    data_host, z_host = host
    mask = np.asarray(data_host.mask)
    leaves, treedef = jax.tree_util.tree_flatten((data_host._replace(mask=None), z_host))
    parts = []
    for lo in range(0, T, S):
        hi = min(lo + S, T)
        pieces = [_chunk_leaf(a, lo, hi, S) for a in leaves]
        chunk_mask = np.zeros((S,) + mask.shape[1:], bool)
        chunk_mask[:hi - lo] = mask[lo:hi]  # padding: masked-out tasks
        fn = _compiled_statistics(model.likelihood, tuple(shape for _, shape in pieces), treedef)
        parts.append((hi - lo, fn(chunk_mask, [piece for piece, _ in pieces])))  # dispatched, not waited for
    moments = jax.tree_util.tree_map(lambda *m: np.sum([np.asarray(a) for a in m], axis=0), *[p[1][1] for p in parts])
    per_task = jax.tree_util.tree_map(
        lambda *leaves: np.concatenate([np.asarray(a)[:n] for (n, _), a in zip(parts, leaves)]),
        *[p[1][0] for p in parts])
    del parts
    grouped = group_statistics(per_task) if group else None
    if grouped is not None:
        stats, valid = _in_chunks(grouped, grouped.ZZ.shape[0], chunk_size)
    else:
        stats, valid = _in_chunks(per_task, T, chunk_size)
    return TaskStatistics(jax.tree_util.tree_map(jnp.asarray, stats), jnp.asarray(valid), moments)


class _Objective(NamedTuple):
    value_and_grad: Callable  # (u, data, psi0, num_tasks) -> (mean negative objective, gradient, psi_hat)
    pack: Callable  # start values -> (u0, psi0)
    split: Callable  # (u, psi) -> constrained (phi, sigma, extra)
    layout: dict  # site -> indices in u
    fixed_effect_hessian: Callable  # (phi, sigma, extra, data) -> -d^2 log L_ML / d psi^2 over the fixed effects
    values: Callable  # (us (n, dim u), data, psi, num_tasks) -> (n,) mean negative objective at each row (no gradient)


@functools.lru_cache(maxsize=32)
def _compiled_objective(model: HierarchicalModel, method: str, approximation: str = "exact", num_nodes: int = 1,
                        statistics: bool = False) -> _Objective:
    """The layout of the optimised vector and the jitted objective, built once per model and method.

    ``u`` is the flat unconstrained vector of the optimised sites (phi, log sigma, the other
    sites unconstrained); for REML the fixed effects ``psi`` (phi, gamma, beta) are not in ``u``
    but profiled by one exact Newton step inside (the objective is quadratic in them).  ``data``
    is the tasks' data, or with ``statistics`` their :class:`TaskStatistics`, the sum over tasks
    then over chunks (a single chunk is evaluated without a loop).  For ML the value and gradient
    are accumulated chunk by chunk in a ``lax.scan`` (each chunk differentiated on its own), so the
    memory beyond the statistics is one chunk's.  REML (and the fixed effects' Hessian) differentiate
    a ``lax.map`` over chunks, whose backward pass keeps each chunk's residuals (O(P^2) numbers per
    task, the order of the statistics): rematerialising them with ``jax.checkpoint`` would bound that
    too, but on jaxlib 0.10 (CPU) that program deadlocks XLA's runtime (reproduced with 2000 tasks,
    P = 8: 2 of 3 runs hung, 0 of 3 without it).
    """
    sites = model.hyper_sites()
    part = model.partition
    fixed_sites = _fixed_effect_sites(model) if method == "REML" else ()
    shapes = {"phi": (part.num_params,), **{n: tuple(s.shape) for n, s in sites.items()}}
    opt_template = {"log_sigma": jnp.zeros(part.num_modules)}
    if "phi" not in fixed_sites:
        opt_template["phi"] = jnp.zeros(part.num_params)
    for name, site in sites.items():
        if name not in fixed_sites:  # unconstrained size of the site
            opt_template[name] = jnp.zeros_like(unconstrain({name: site}, {name: site.init})[name])
    _, unravel_opt = ravel_pytree(opt_template)
    _, unravel_fixed = ravel_pytree({n: jnp.zeros(shapes[n]) for n in fixed_sites})

    def pack(start):
        opt = {"log_sigma": jnp.log(jnp.asarray(start["sigma"], float))}
        if "phi" not in fixed_sites:
            opt["phi"] = jnp.asarray(start["phi"], float)
        opt.update(unconstrained(model, {n: start[n] for n in sites if n not in fixed_sites}))
        psi = ravel_pytree({n: jnp.asarray(start[n], float) for n in fixed_sites})[0]
        return ravel_pytree(opt)[0], psi

    def split(u, psi):
        values = {**unravel_opt(u), **unravel_fixed(psi)}
        extra = constrain({n: sites[n] for n in sites if n not in fixed_sites}, values)
        extra.update({n: values[n] for n in fixed_sites if n in sites})
        return values["phi"], jnp.exp(values["log_sigma"]), extra

    def neg_log_marginal(phi, sigma, extra, data):
        if not statistics:
            return -jnp.sum(log_marginal_likelihood(model, phi, sigma, data, extra, approximation=approximation,
                                                    num_nodes=num_nodes))
        lik = model.likelihood
        L = model.prior_scale_tril(jnp.broadcast_to(sigma, (part.num_modules,)), extra)
        g = model.globals_of(extra)

        def chunk(args):
            stats, valid = args
            if isinstance(stats, GroupedStatistics):  # the prior mean is affine in z: its value at 0 and slope
                Q = model.num_task_covariates
                at_zero = model.prior_mean(phi, extra, jnp.zeros((1, Q)) if Q else None).reshape(-1)
                slope = model.prior_mean(phi, extra, jnp.eye(Q)) - at_zero if Q else None
                values = lik.log_marginal_from_groups(stats, at_zero, slope, L, g)
            else:
                values = lik.log_marginal_from_statistics(stats, model.prior_mean(phi, extra, stats.task_covariates), L, g)
            return jnp.sum(jnp.where(valid, values, 0.0))

        if data.valid.shape[0] == 1:  # one chunk: no loop
            return -chunk(jax.tree_util.tree_map(lambda a: a[0], (data.stats, data.valid)))
        return -jnp.sum(jax.lax.map(chunk, (data.stats, data.valid)))

    def neg_ml(u, psi, data):
        return neg_log_marginal(*split(u, psi), data)

    def objective(u, data, psi0):
        if not fixed_sites:
            return neg_ml(u, psi0, data), psi0
        value = lambda psi: neg_ml(u, psi, data)
        H = jax.hessian(value)(psi0)
        psi_hat = psi0 - jnp.linalg.solve(H, jax.grad(value)(psi0))  # exact: quadratic in psi
        log_det = 2.0 * jnp.sum(jnp.log(jnp.diag(jnp.linalg.cholesky(H))))
        return value(psi_hat) + 0.5 * log_det - 0.5 * psi0.shape[0] * jnp.log(2.0 * jnp.pi), psi_hat

    def chunkwise_value_and_grad(u, data, psi0):
        """ML on statistics in several chunks: each chunk's value and gradient in turn, summed in a
        ``lax.scan`` (nothing of a chunk is kept for a backward pass: memory is one chunk's)."""

        def body(carry, chunk):
            stats, valid = chunk
            one = TaskStatistics(jax.tree_util.tree_map(lambda a: a[None], stats), valid[None])
            value, grad = jax.value_and_grad(neg_ml)(u, psi0, one)
            return (carry[0] + value, carry[1] + grad), None

        (value, grad), _ = jax.lax.scan(body, (jnp.zeros((), u.dtype), jnp.zeros_like(u)), (data.stats, data.valid))
        return value, grad

    @jax.jit
    def value_and_grad(u, data, psi0, num_tasks):
        if statistics and not fixed_sites and data.valid.shape[0] > 1:
            value, grad = chunkwise_value_and_grad(u, data, psi0)
            return value / num_tasks, grad / num_tasks, psi0
        (value, psi_hat), grad = jax.value_and_grad(objective, has_aux=True)(u, data, psi0)
        return value / num_tasks, grad / num_tasks, psi_hat

    fe_names = _fixed_effect_sites(model)

    @jax.jit
    def fixed_effect_hessian(phi, sigma, extra, data):
        values = {"phi": phi, **extra}
        psi, unravel = ravel_pytree({n: values[n] for n in fe_names})

        def f(p):
            v = unravel(p)
            return neg_log_marginal(v["phi"], sigma, {**extra, **{n: v[n] for n in fe_names if n != "phi"}}, data)

        return jax.hessian(f)(psi)

    size = ravel_pytree(opt_template)[0].shape[0]
    layout = {name: np.rint(np.asarray(index)).astype(int).ravel()
              for name, index in unravel_opt(jnp.arange(size, dtype=ravel_pytree(opt_template)[0].dtype)).items()}
    @jax.jit
    def values(us, data, psi, num_tasks):
        return jax.lax.map(lambda u: objective(u, data, psi)[0], us) / num_tasks

    return _Objective(value_and_grad, pack, jax.jit(split), layout, fixed_effect_hessian, values)


def type2_ml(
    model: HierarchicalModel,
    data,
    *,
    method: str = "ML",
    approximation: str = "auto",
    num_nodes: Optional[int] = None,
    init: Optional[Mapping[str, Any]] = None,
    max_iter: int = 1000,
    tol: float = 1e-6,
    warn: bool = True,
    chunk_size: Optional[int] = None,
) -> Type2MLResult:
    """Type-II maximum likelihood (or REML) of every hyperparameter of ``model`` on ``data``.

    Args:
      data: every task's observations (support and query merged), with a leading task axis.
      method: ``"ML"`` (maximise the marginal likelihood) or ``"REML"`` (integrate the fixed
        effects phi, gamma, beta out first; lme4's and statsmodels' default for linear mixed
        models; exact linear-Gaussian likelihoods only).
      approximation: each task's marginal likelihood: ``"exact"`` (closed form), ``"laplace"``,
        ``"agq"`` (adaptive Gauss-Hermite quadrature, one scalar random effect, ``num_nodes``
        nodes as lme4's ``nAGQ``), or ``"auto"`` (exact where the likelihood has a closed form, else
        Laplace, or AGQ when ``num_nodes > 1``); see :mod:`hiermeta.laplace`.
      init: starting values (constrained): ``phi``, ``sigma`` and any site of
        :meth:`~hiermeta.HierarchicalModel.hyper_sites`; the rest start on the data's scale
        when the likelihood can say (its ``initial_values``), else at ``phi = 0``, ``sigma = 1``
        and each site's default.
      tol: the largest gradient component of the mean objective per task at which it has converged.
      warn: warn (:class:`EmpiricalBayesWarning`) when it did not converge, ended on a boundary, or
        (Laplace, AGQ) a task's Hessian is not positive definite or its mode was not found.
      chunk_size: tasks per chunk for an exact linear-Gaussian likelihood, whose objective runs on
        per-task sufficient statistics computed once (:func:`task_statistics`) and summed chunk by
        chunk: memory beyond the statistics is one chunk's, time linear in the number of tasks.
        Default ``min(T, 4096)``.  The result does not depend on it (to rounding).

    One compiled objective per (model, method, data shape, chunk size): calling again with data of
    the same shape compiles nothing.
    """
    if method not in ("ML", "REML"):
        raise ValueError(f"method must be 'ML' or 'REML', got {method!r}")
    if jnp.zeros(()).dtype != jnp.float64:
        warnings.warn("type-II ML is meant for float64: enable jax_enable_x64", stacklevel=2)
    if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    tol = check_positive(tol, "tol (the largest gradient component of a converged fit)")
    model.likelihood.check(data, "data")
    approximation, num_nodes = resolve_approximation(model, approximation, num_nodes)
    if method == "REML" and approximation != "exact":
        raise ValueError(
            f"REML is defined here only for an exact linear-Gaussian marginal likelihood; with "
            f"approximation={approximation!r} use method='ML' (as lme4's glmer does)"
        )
    T = int(jax.tree_util.tree_leaves(data)[0].shape[0])
    given = check_values(model, init, where="init")  # before anything is computed
    statistics = uses_statistics(model, data, approximation)
    if chunk_size is not None:
        check_count(chunk_size, "chunk_size", 1)
    inputs = task_statistics(model, data, chunk_size) if statistics else data
    if statistics:  # the pooled fit from the statistics pass, not from the rows again
        data_values = model.likelihood.start_from_moments(inputs.moments, model)
        inputs = inputs._replace(moments=None)
    else:
        data_values = data_start(model, data, check=False)
    start = start_values(model, given=given, data_values=data_values)
    objective = _compiled_objective(model, method, approximation, num_nodes, statistics)
    value_and_grad, split, layout = objective.value_and_grad, objective.split, objective.layout
    x0, psi0 = objective.pack(start)
    num = jnp.asarray(float(T))

    def fun(x):
        value, grad, _ = value_and_grad(jnp.asarray(x), inputs, psi0, num)
        return float(value), np.asarray(grad, dtype=float)

    with blas_threads(1):
        result = scipy.optimize.minimize(
            fun, np.asarray(x0), jac=True, method="L-BFGS-B",
            options={"maxiter": int(max_iter), "gtol": tol, "ftol": 0.0},
        )
    value, grad, psi_hat = value_and_grad(jnp.asarray(result.x), inputs, psi0, num)
    value, grad = float(value), np.asarray(grad)
    gnorm = float(np.max(np.abs(grad))) if grad.size else 0.0
    phi, sigma, extra = split(jnp.asarray(result.x), psi_hat)
    fe_sites = _fixed_effect_sites(model)
    if approximation == "exact":
        se = _fixed_effect_errors(model, objective, phi, sigma, extra, inputs, fe_sites)
    else:
        se = _observed_information_errors(lambda x: fun(x)[1] * T, np.asarray(result.x), layout, fe_sites)
    estimate = {"phi": np.asarray(phi), "sigma": np.asarray(sigma), **{n: np.asarray(v) for n, v in extra.items()}}

    def objective_at_sigmas(sigma_rows):  # the mean objective with sigma replaced by each row, the rest at the estimate
        us = np.tile(np.asarray(result.x, dtype=float), (len(sigma_rows), 1))
        with np.errstate(divide="ignore"):
            us[:, layout["log_sigma"]] = np.log(np.asarray(sigma_rows, dtype=float))
        return np.asarray(objective.values(jnp.asarray(us), inputs, psi_hat, num))

    # a sigma of exactly 0 has no Laplace approximation (the prior is a point mass); 1e-8 on the
    # link scale is 0 for every purpose
    singular = _boundary(model, estimate, value, objective_at_sigmas, tol, zero=0.0 if approximation == "exact" else 1e-8)
    not_pd, inner_ok = (), True
    if approximation != "exact":
        info = _marginal_info(model, approximation, num_nodes if approximation == "agq" else None)(
            phi, sigma, data, extra)
        not_pd = tuple(int(t) for t in np.flatnonzero(~np.asarray(info.hessian_pd)))
        inner_ok = bool(np.all(np.asarray(info.converged)))
    converged = bool(gnorm <= tol) and bool(np.isfinite(value))
    out = Type2MLResult(
        phi=np.asarray(phi),
        sigma=np.asarray(sigma),
        log_marginal=-value * T,
        num_iterations=int(result.nit),
        grad_norm=gnorm,
        converged=converged,
        message=str(result.message),
        extra={n: np.asarray(v) for n, v in extra.items()},
        method=method,
        phi_se=se.get("phi"),
        fixed_effects_se=se,
        singular=singular,
        approximation=approximation,
        num_nodes=num_nodes,
        not_positive_definite=not_pd,
        inner_converged=inner_ok,
    )
    if warn:
        label = method if approximation == "exact" else f"{method} ({approximation}" + (
            f", {num_nodes} nodes)" if approximation == "agq" else ")")
        if not converged:
            warnings.warn(
                f"type-II {label} did not converge: largest gradient component {gnorm:.3g} > tol {tol:g} "
                f"after {out.num_iterations} iterations ({out.message}); the estimates are not the optimum",
                EmpiricalBayesWarning, stacklevel=2,
            )
        if singular:
            warnings.warn(
                f"type-II {label} ended on a boundary (singular fit): {', '.join(singular)}; the data do "
                "not support that variation (lme4 reports this as 'boundary (singular) fit')",
                EmpiricalBayesWarning, stacklevel=2,
            )
        if not_pd:
            warnings.warn(
                f"type-II {label}: the Hessian of the inner objective at the mode is not positive definite "
                f"for task(s) {list(not_pd[:10])}: the {approximation} approximation is not valid there "
                "(a saddle, or a likelihood that is not log-concave); its log-determinant was floored",
                EmpiricalBayesWarning, stacklevel=2,
            )
        if not inner_ok:
            warnings.warn(
                f"type-II {label}: the Newton solve of some task's mode did not converge at the estimate; "
                "the approximate marginal likelihood there is not reliable",
                EmpiricalBayesWarning, stacklevel=2,
            )
    return out


def _observed_information_errors(gradient, x, layout: dict, names) -> dict:
    """Standard errors of the fixed-effect sites from the inverse of the full observed information
    ``H = d^2 (-log L) / du^2`` over every optimised coordinate ``u``, by central differences of the
    exact gradient (step ``1e-4 max(1, |u_i|)``, symmetrised).  Empty if ``H`` is not positive definite."""
    k = x.shape[0]
    H = np.empty((k, k))
    for i in range(k):
        h = 1e-4 * max(1.0, abs(x[i]))
        e = np.zeros(k)
        e[i] = h
        H[:, i] = (gradient(x + e) - gradient(x - e)) / (2 * h)
    H = 0.5 * (H + H.T)
    try:
        np.linalg.cholesky(H)
    except np.linalg.LinAlgError:
        return {}
    cov = np.linalg.inv(H)
    return {n: np.sqrt(np.diag(cov)[layout[n]]) for n in names if n in layout}


def _fixed_effect_errors(model, objective: _Objective, phi, sigma, extra, data, names) -> dict:
    """``sqrt(diag(H^-1))`` for the fixed effects, ``H = -d^2 log L_ML / d psi^2`` at the estimate
    (``data``: the tasks' data or their :class:`TaskStatistics`, as the objective takes)."""
    H = np.asarray(objective.fixed_effect_hessian(phi, sigma, extra, data))
    try:
        cov = np.linalg.inv(H)
    except np.linalg.LinAlgError:
        return {}
    se = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    values = {"phi": np.asarray(phi), **{n: np.asarray(v) for n, v in extra.items()}}
    out, start = {}, 0
    for n in sorted(names):  # the order of ravel_pytree over a dict
        size = values[n].size
        out[n] = se[start:start + size].reshape(values[n].shape)
        start += size
    return out


@functools.lru_cache(maxsize=32)
def _marginal_info(model: HierarchicalModel, approximation: str, num_nodes):
    """:func:`~hiermeta.laplace.compiled_marginal_info`, built once per model and approximation."""
    return compiled_marginal_info(model, approximation, num_nodes)


def _boundary(model, estimate: dict, value: float, objective_at_sigmas, tol: float, zero: float = 0.0) -> tuple:
    """What sits on the boundary: modules whose sigma can be set to ``zero`` (exactly 0 where the
    marginal likelihood allows it) without lowering the objective by more than ``tol`` per task,
    and correlations within 1e-4 of +-1.  ``objective_at_sigmas(rows (M, M)) -> (M,)``: the mean
    objective with sigma replaced by each row, every other parameter at the estimate (one call)."""
    sigma = np.asarray(estimate["sigma"], dtype=float)
    M = sigma.shape[0]
    rows = np.where(np.eye(M, dtype=bool), zero, sigma[None, :])  # row m: module m's sigma at zero
    at_zero = objective_at_sigmas(rows)
    names = [f"sigma[{name}]" for m, name in enumerate(model.partition.names) if at_zero[m] <= value + tol]
    for k in range(len(model.correlation_blocks)):
        L = np.asarray(estimate[f"corr_chol_{k}"])
        C = L @ L.T
        off = np.abs(C[~np.eye(C.shape[0], dtype=bool)])
        if off.size and np.max(off) > 1 - 1e-4:
            names.append(f"corr_chol_{k} (a correlation of +-1)")
    return tuple(names)


# ---------------------------------------------------------------------------- the low-level driver


@functools.lru_cache(maxsize=32)
def _compiled_hand_written(log_marginal: Callable, num_params: int) -> Callable:
    """The jitted mean objective of :func:`type2_maximum_likelihood`, built once per ``log_marginal``."""

    @jax.jit
    def value_and_grad(x, data, num_tasks):
        def objective(x):
            phi, log_sigma = x[:num_params], x[num_params:]
            return -log_marginal(phi, jnp.exp(log_sigma), data) / num_tasks

        return jax.value_and_grad(objective)(x)

    return value_and_grad


def type2_maximum_likelihood(
    log_marginal: Callable[[jax.Array, jax.Array, Any], jax.Array],
    phi0,
    sigma0,
    data: Any,
    *,
    num_tasks: int,
    max_iter: int = 500,
    tol: float = 1e-6,
) -> Type2MLResult:
    """Maximise a user's ``log_marginal(phi, sigma, data) = sum_t log p(D_t | phi, sigma)``.

    The low-level form of :func:`type2_ml` for a marginal likelihood written by hand (phi and
    sigma only).  ``data`` is passed to ``log_marginal`` as a traced argument (never baked into the
    compiled program); ``num_tasks`` scales the objective to a mean per task (``tol`` is per task).
    The compiled objective is built once per ``log_marginal`` function and reused by later calls.
    """
    if jnp.zeros(()).dtype != jnp.float64:
        warnings.warn("type-II ML is meant for float64: enable jax_enable_x64", stacklevel=2)
    tol = check_positive(tol, "tol (the largest gradient component of a converged fit)")
    sigma0 = np.asarray(sigma0, dtype=float)
    if not np.all(np.isfinite(sigma0)) or np.any(sigma0 <= 0):
        raise ValueError(f"sigma0 must be finite and > 0, got {sigma0}")

    P = int(np.size(phi0))
    x0 = np.concatenate([np.asarray(phi0, float).ravel(), np.log(sigma0).ravel()])

    value_and_grad = _compiled_hand_written(log_marginal, P)
    num = jnp.asarray(float(num_tasks))

    def fun(x):
        value, grad = value_and_grad(jnp.asarray(x), data, num)
        return float(value), np.asarray(grad, dtype=float)

    with blas_threads(1):
        result = scipy.optimize.minimize(
            fun, x0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter, "gtol": tol, "ftol": 0.0}
        )
    value, grad = fun(result.x)
    gnorm = float(np.max(np.abs(grad)))
    return Type2MLResult(
        phi=np.asarray(result.x[:P]),
        sigma=np.exp(np.asarray(result.x[P:])),
        log_marginal=-value * num_tasks,
        num_iterations=int(result.nit),
        grad_norm=gnorm,
        converged=bool(gnorm <= tol) and bool(np.isfinite(value)),
        message=str(result.message),
    )
