"""The Student-t family (identity link): robust regression.

    y_{t,n} ~ StudentT(df, loc = eta_{t,n}, scale),   eta_{t,n} = Z_{t,n} theta_t + X_{t,n} beta + offset

Heavy tails make a few outlying observations cost little, so they pull a task's parameters less
than under Gaussian noise.  ``scale`` and ``df`` are global parameters of the model (shared by
every task; site names ``scale`` and ``df``), each learned unless a value is given.  With both
fixed the family has no global parameter besides ``beta``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import gammaln
from numpyro.distributions import constraints

from ..sites import GlobalParam
from .base import GLMData, GLMLikelihood

__all__ = ["StudentTLikelihood", "student_t"]


def _fixed_positive(value, name):
    if value is None:
        return None
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0 (or None to learn it), got {value}")
    return value


class StudentTLikelihood(GLMLikelihood):
    """Student-t observations around the linear predictor; see the module docstring.

    Args:
      scale: the t scale, or None to learn it (global ``scale``, positive; prior ``scale_prior``).
      df: the degrees of freedom, or None to learn them (global ``df``, positive; prior ``df_prior``,
        starting value ``df_init``).
    """

    name = "student_t"

    def __init__(self, *, num_fixed: int = 0, scale=None, df=None, beta_prior=None, scale_prior=None,
                 df_prior=None, df_init: float = 5.0, site: str = "obs"):
        self.fixed_scale = _fixed_positive(scale, "scale")
        self.fixed_df = _fixed_positive(df, "df")
        self._priors = (scale_prior, df_prior)
        self._df_init = _fixed_positive(df_init, "df_init")
        super().__init__(num_fixed=num_fixed, beta_prior=beta_prior, site=site)

    def _family_globals(self) -> dict:
        out = {}
        if self.fixed_scale is None:
            out["scale"] = GlobalParam((), constraints.positive, self._priors[0])
        if self.fixed_df is None:
            out["df"] = GlobalParam((), constraints.positive, self._priors[1], self._df_init)
        return out

    def _parameters(self, g):
        scale = self.fixed_scale if self.fixed_scale is not None else g["scale"]
        df = self.fixed_df if self.fixed_df is not None else g["df"]
        return scale, df

    def distribution(self, eta, data: GLMData, g: Optional[Mapping[str, Any]] = None):
        scale, df = self._parameters(g)
        return dist.StudentT(df, eta, scale)

    def cdf_from_eta(self, eta, data: GLMData, value, g=None):
        scale, df = self._parameters(g)
        return dist.StudentT(df, eta, scale).cdf(value)

    def log_normaliser(self, data: GLMData):
        """Per observation ``-log(pi)/2``, plus the terms of the fixed df and scale, if fixed."""
        per_obs = -0.5 * jnp.log(jnp.pi)
        if self.fixed_df is not None:
            nu = self.fixed_df
            per_obs = per_obs + gammaln((nu + 1) / 2) - gammaln(nu / 2) - 0.5 * jnp.log(nu)
        if self.fixed_scale is not None:
            per_obs = per_obs - jnp.log(self.fixed_scale)
        return per_obs * jnp.sum(data.mask, axis=-1)

    def _check_family(self, data, where, observed):
        pass

    def _pooled_fit(self, A, data, observed, offset):
        """Least squares, then a robust residual scale (1.4826 MAD) as the unit of the link scale."""
        y = np.asarray(data.response, float)[observed] - offset
        coef = np.linalg.lstsq(A, y, rcond=None)[0]
        resid = y - A @ coef
        mad = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
        scale = mad if np.isfinite(mad) and mad > 0 else float(np.std(resid))
        return coef, scale if np.isfinite(scale) and scale > 0 else 1.0

    def _family_start(self, data, observed, link_scale):
        return {"scale": np.asarray(link_scale)} if self.fixed_scale is None else {}

    def _response_scale(self, data, observed):
        sd = float(np.std(np.asarray(data.response, float)[observed]))
        return sd if sd > 0 else 1.0

    def _family_priors(self, data, observed):
        """``scale ~ Exponential(1 / sd(y))``, ``df ~ Gamma(2, 0.1)`` (Juarez and Steel, 2010)."""
        out = {}
        if self.fixed_scale is None and self._priors[0] is None:
            out["scale"] = dist.Exponential(1.0 / self._response_scale(data, observed))
        if self.fixed_df is None and self._priors[1] is None:
            out["df"] = dist.Gamma(2.0, 0.1)
        return out


def student_t(*, num_fixed: int = 0, scale=None, df=None, **kwargs) -> StudentTLikelihood:
    """The Student-t family (identity link); ``scale`` and ``df`` learned unless given."""
    return StudentTLikelihood(num_fixed=num_fixed, scale=scale, df=df, **kwargs)
