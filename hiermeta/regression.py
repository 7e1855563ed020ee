"""What every regression likelihood shares: its design, and starting values and priors scaled to the data.

A regression likelihood (the linear-Gaussian one, :mod:`hiermeta.linear_gaussian`, and the GLM
families, :mod:`hiermeta.families`) predicts each observation from a linear predictor

    eta = Z theta_t + X beta + offset,

with ``Z`` the design of the task parameters, ``X`` that of unpooled fixed effects ``beta`` (a
global parameter) and a known offset (:class:`LinearDesign`).  Its starting values come from a
pooled fit (every task the same theta) and its default hyperpriors are rstanarm's autoscaling of
that fit (:func:`regression_prior_scales`); both are on the link scale.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

__all__ = ["LinearDesign", "linear_predictor", "column_spread", "module_mean", "min_norm_solve",
           "regression_prior_scales"]


class LinearDesign(NamedTuple):
    """The inputs of a regression task: ``random`` ``Z``, optional ``fixed`` ``X`` and ``offset``.

    Shapes ``(T, N, D, P)``, ``(T, N, D, K)``, ``(T, N, D)`` for the linear-Gaussian likelihood
    (``D`` scalars per observation; a bare array as inputs means ``Z``), ``(T, N, P)``,
    ``(T, N, K)``, ``(T, N)`` for the GLM families (one scalar per observation)."""

    random: Any
    fixed: Any = None
    offset: Any = None


def linear_predictor(design: LinearDesign, theta, beta=None):
    """``Z theta + X beta + offset`` over the design's last axis (``theta`` broadcasting against ``Z``'s
    leading axes, e.g. ``(P,)`` for one task, ``(T, 1, P)`` for ``Z`` ``(T, N, P)``; ``beta`` ``(K,)``
    when the design has ``X``)."""
    eta = jnp.einsum("...p,...p->...", design.random, theta)
    if design.fixed is not None and beta is not None:
        eta = eta + jnp.einsum("...k,k->...", design.fixed, beta)
    if design.offset is not None:
        eta = eta + design.offset
    return eta


def module_mean(model, per_coordinate) -> np.ndarray:
    """``(M,)`` the mean of ``per_coordinate`` ``(P,)`` over each module's coordinates."""
    index = model.partition.index
    counts = np.bincount(index, minlength=model.partition.num_modules)
    return np.bincount(index, weights=np.asarray(per_coordinate, float), minlength=len(counts)) / counts


def min_norm_solve(normal: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """The minimum-norm solution of the normal equations ``A^T W A x = A^T W y`` (``normal``, ``rhs``):
    the weighted least-squares fit ``np.linalg.lstsq`` gives, also for a rank-deficient design
    (eigenvalues below ``k eps`` times the largest are taken as 0)."""
    normal = 0.5 * (normal + normal.T)
    values, vectors = np.linalg.eigh(normal)
    keep = values > normal.shape[0] * np.finfo(float).eps * max(float(values[-1]), 0.0) if values.size else values > 0
    inverse = np.where(keep, 1.0 / np.where(keep, values, 1.0), 0.0)
    return vectors @ (inverse * (vectors.T @ rhs))


def column_spread(columns: np.ndarray) -> np.ndarray:
    """Standard deviation of each design column, its root mean square when it is constant (1 if 0)."""
    sd, rms = np.std(columns, axis=0), np.sqrt(np.mean(columns**2, axis=0))
    out = np.where(sd > 1e-12 * np.maximum(rms, 1e-300), sd, rms)
    return np.where(out > 0, out, 1.0)


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
    out = {
        "phi_loc": start["phi"],
        "phi_scale": 2.5 * scale / s_z,
        "sigma_scale": module_mean(model, scale / s_z),
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
