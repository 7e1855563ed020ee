"""Starting values of the hyperparameters, checked, and their unconstrained form: one place for the
meta-learners (:mod:`hiermeta.learners`) and type-II ML (:func:`hiermeta.type2_ml`).

A fit starts every hyperparameter site (``phi``, ``sigma`` and the sites of
:meth:`~hiermeta.HierarchicalModel.hyper_sites`: the likelihood's globals such as ``noise_sd`` and
``beta``, correlation factors ``corr_chol_k``, group coefficients ``gamma``) at, in order of
precedence:

1. the constrained value the user gives (checked by :func:`check_values`: a known site, its shape,
   finite, inside its support; a correlation site as its Cholesky factor or the correlation
   matrix itself);
2. the likelihood's data-scaled start (:func:`data_start`: its ``initial_values(data, model)``, a
   pooled fit: for a regression likelihood phi, beta, gamma from the pooled least squares or GLM
   and sigma the size of an effect that moves the linear predictor by one residual unit);
3. the site's default (:func:`default_start`: phi 0, sigma 1, the site's ``init``).

The optimisers work in unconstrained coordinates (:func:`unconstrained`: log sigma, NumPyro's
bijections for the other sites, :mod:`hiermeta.sites`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
from numpyro.distributions import constraints

from .hierarchy import HierarchicalModel
from .sites import unconstrain

__all__ = ["data_start", "default_start", "check_values", "start_values", "unconstrained", "correlation_factor"]


def data_start(model: HierarchicalModel, data, check: bool = True) -> dict:
    """Constrained starts on the data's scale from the likelihood's ``initial_values(data, model)``
    (the data checked first unless ``check`` is False: already checked), or ``{}`` without data or
    without that method."""
    if data is None:
        return {}
    start = getattr(model.likelihood, "initial_values", None)
    if not callable(start):
        return {}
    if check:
        model.likelihood.check(data, "data")
    return dict(start(data, model))


def default_start(model: HierarchicalModel) -> dict:
    """phi 0, sigma 1 and every other site's default start (constrained)."""
    part = model.partition
    return {"phi": np.zeros(part.num_params), "sigma": np.ones(part.num_modules),
            **{name: np.asarray(site.init, dtype=float) for name, site in model.hyper_sites().items()}}


def correlation_factor(name: str, value) -> np.ndarray:
    """A correlation site's start as its Cholesky factor: given the factor, or the correlation matrix."""
    v = np.asarray(value, dtype=float)
    if v.ndim != 2 or v.shape[0] != v.shape[1] or not np.all(np.isfinite(v)):
        return v  # the shape check names it
    if np.allclose(v, np.tril(v)) and not np.allclose(v, v.T):
        factor = v
    else:  # a symmetric matrix: the correlation matrix itself
        if not np.allclose(v, v.T) or not np.allclose(np.diag(v), 1.0):
            raise ValueError(f"{name}: a starting correlation matrix must be symmetric with unit diagonal, got {v.tolist()}")
        try:
            factor = np.linalg.cholesky(v)
        except np.linalg.LinAlgError:
            raise ValueError(f"{name}: the starting correlation matrix {v.tolist()} is not positive definite") from None
        if np.min(np.abs(np.diag(factor))) < 1e-8:
            raise ValueError(f"{name}: the starting correlation matrix {v.tolist()} is not positive definite")
        return factor
    rows = np.linalg.norm(factor, axis=1)
    if not np.allclose(rows, 1.0, atol=1e-6) or np.any(np.diag(factor) <= 1e-8):
        raise ValueError(
            f"{name} = {factor.tolist()} is not the Cholesky factor of a positive-definite correlation "
            "matrix (rows of unit norm, positive diagonal); give the factor or the correlation matrix"
        )
    return factor


def check_values(model: HierarchicalModel, values: Optional[Mapping[str, Any]], allowed=None,
                 where: str = "init", learner: str = "") -> dict:
    """The one validator of user-given constrained starts: ``values`` (site -> value) as float arrays.

    ``allowed``: the sites that may be given (default phi, sigma and every hyper site); a site of the
    model that is not allowed is refused as one ``learner`` does not learn, an unknown name as
    unknown.  Each value must have its site's shape (sigma: a scalar or one per module), be finite
    and lie in its site's support (sigma > 0; a correlation site may be the correlation matrix,
    turned into its Cholesky factor).  Raises ``ValueError`` naming the site and the problem.
    """
    values = dict(values or {})
    part = model.partition
    sites = model.hyper_sites()
    known = {"phi", "sigma", *sites}
    allowed = known if allowed is None else set(allowed)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where} names unknown sites {unknown}; the model's sites are {sorted(known)}")
    refused = sorted(set(values) - allowed)
    if refused:
        raise ValueError(f"{learner or 'this fit'} does not learn {refused} (they stay at their defaults); "
                         f"{where} may set {sorted(allowed)}")
    out = {}
    for name, value in values.items():
        if name == "sigma":
            sigma = part.check_per_module(value, f"{where} sigma")
            if not np.all(np.isfinite(sigma)) or np.any(sigma <= 0):
                raise ValueError(f"{where} sigma must be finite and > 0, got {sigma}")
            out[name] = sigma
            continue
        shape = (part.num_params,) if name == "phi" else tuple(sites[name].shape)
        value = np.asarray(value, dtype=float)
        if name != "phi" and sites[name].constraint is constraints.corr_cholesky:
            value = correlation_factor(f"{where}[{name!r}]", value)
        if value.shape != shape:
            raise ValueError(f"{where}[{name!r}] must have shape {shape}, got {value.shape}")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{where}[{name!r}] must be finite, got {value}")
        if name != "phi":
            try:
                unconstrain({name: sites[name]}, {name: value})
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        out[name] = value
    return out


def start_values(model: HierarchicalModel, data=None, given: Optional[Mapping[str, Any]] = None, *,
                 data_values: Optional[Mapping[str, Any]] = None, allowed=None, where: str = "init",
                 learner: str = "") -> dict:
    """Every site's constrained start: ``given`` (checked) over the data's (``data_values`` when
    already computed, else :func:`data_start` of ``data``) over the defaults (module docstring)."""
    out = default_start(model)
    out.update(data_start(model, data) if data_values is None else dict(data_values))
    out.update(check_values(model, given, allowed, where, learner))
    return out


def unconstrained(model: HierarchicalModel, values: Mapping[str, Any]) -> dict:
    """The unconstrained value of every hyper site among ``values`` (constrained, checked)."""
    sites = {name: site for name, site in model.hyper_sites().items() if name in values}
    return unconstrain(sites, {name: values[name] for name in sites})
