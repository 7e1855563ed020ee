"""The Bernoulli family (logit link): binary outcomes.

    y_{t,n} ~ Bernoulli(p_{t,n}),   logit p_{t,n} = eta_{t,n} = Z_{t,n} theta_t + X_{t,n} beta + offset

(lme4's ``glmer(y ~ x + (1 | g), family = binomial)`` with 0/1 responses).  The log-density has
no constant part; the predictive scores add the Brier score for it (``binary = True``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from .base import GLMData, GLMLikelihood
from .binomial import logit_pooled_fit

__all__ = ["BernoulliLikelihood", "bernoulli"]


class BernoulliLikelihood(GLMLikelihood):
    """Binary observations with a logit link; see the module docstring and :class:`GLMLikelihood`."""

    name = "bernoulli"
    discrete = True
    binary = True

    def distribution(self, eta, data: GLMData, g: Optional[Mapping[str, Any]] = None):
        return dist.BernoulliLogits(logits=eta)

    def cdf_from_eta(self, eta, data: GLMData, value, g=None):
        k = jnp.floor(value)
        return jnp.where(k < 0, 0.0, jnp.where(k >= 1, 1.0, 1.0 / (1.0 + jnp.exp(eta))))

    def make_data(self, response, mask=None, random=None, fixed=None, offset=None,
                  task_covariates=None) -> GLMData:
        """As :meth:`GLMLikelihood.make_data`; the response may also be boolean (True is 1)."""
        y = np.asarray(response)
        return super().make_data(y.astype(float) if y.dtype == bool else response, mask, random, fixed, offset,
                                 task_covariates)

    def _check_family(self, data: GLMData, where: str, observed: np.ndarray) -> None:
        y = np.asarray(data.response)[observed]
        bad = (y != 0) & (y != 1)
        if np.any(bad):
            raise ValueError(f"{where}: a Bernoulli response must be 0 or 1, got {np.unique(y[bad])[:5].tolist()} "
                             "(counts out of several trials: use the binomial family)")

    def _pooled_fit(self, A, data, observed, offset):
        y = np.asarray(data.response, float)[observed]
        return logit_pooled_fit(A, y, np.ones_like(y), offset), 1.0


def bernoulli(*, num_fixed: int = 0, beta_prior=None, site: str = "obs") -> BernoulliLikelihood:
    """The Bernoulli family with a logit link (``num_fixed = K`` unpooled fixed effects ``beta``)."""
    return BernoulliLikelihood(num_fixed=num_fixed, beta_prior=beta_prior, site=site)
