"""The Poisson family (log link) for counts, with an exposure (offset ``log exposure``).

    y_{t,n} ~ Poisson(mu_{t,n}),   log mu_{t,n} = eta_{t,n} = Z_{t,n} theta_t + X_{t,n} beta + log E_{t,n} + offset

(lme4's ``glmer(y ~ x + (1 | g) + offset(log(E)), family = poisson)``).  ``log p`` includes
``-log y!``, which :meth:`log_normaliser` returns for the generalisation loss.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import gammaincc, gammaln

from .base import GLMData, GLMLikelihood, newton_glm
from .binomial import check_counts

__all__ = ["PoissonLikelihood", "poisson"]


class PoissonLikelihood(GLMLikelihood):
    """Poisson counts with a log link; see the module docstring and :class:`GLMLikelihood`."""

    name = "poisson"
    discrete = True

    def distribution(self, eta, data: GLMData, g: Optional[Mapping[str, Any]] = None):
        return dist.Poisson(jnp.exp(eta))

    def cdf_from_eta(self, eta, data: GLMData, value, g=None):
        """``P(y <= k) = Q(k + 1, mu)`` (the regularised upper incomplete gamma function)."""
        k = jnp.floor(value)
        return jnp.where(k < 0, 0.0, gammaincc(jnp.maximum(k, 0.0) + 1.0, jnp.exp(eta)))

    def log_normaliser(self, data: GLMData):
        """``-sum_n log y_{t,n}!`` per task."""
        return -jnp.sum(jnp.where(data.mask, gammaln(data.response + 1.0), 0.0), axis=-1)

    def make_data(self, response, mask=None, random=None, fixed=None, offset=None, task_covariates=None,
                  *, exposure=None) -> GLMData:
        """:meth:`GLMLikelihood.make_data` with an optional ``exposure`` ``(T, N)`` (broadcast; > 0):
        the expected count scales with it (``log exposure`` joins the offset)."""
        y = np.asarray(response)
        if exposure is not None:
            try:
                exposure = np.broadcast_to(np.asarray(exposure, dtype=float), y.shape)
            except ValueError:
                raise ValueError(f"exposure of shape {np.shape(exposure)} does not broadcast to response {y.shape}") from None
            observed = np.ones(y.shape, bool) if mask is None else np.asarray(mask, bool)
            if np.shape(observed) == y.shape:
                e = exposure[observed]
                if not np.all(np.isfinite(e)) or np.any(e <= 0):
                    raise ValueError(f"exposure must be finite and > 0, got {e[~(e > 0) | ~np.isfinite(e)][:5].tolist()}")
            log_e = np.log(np.where(observed, exposure, 1.0))
            offset = log_e if offset is None else np.asarray(offset, dtype=float) + log_e
        return self._validated(self._assemble(response, mask, random, fixed, offset, task_covariates))

    def _check_family(self, data: GLMData, where: str, observed: np.ndarray) -> None:
        check_counts(np.asarray(data.response)[observed], "response (counts)", where)

    def _pooled_fit(self, A, data, observed, offset):
        y = np.asarray(data.response, float)[observed]

        def gradient_and_weights(eta):
            mu = np.exp(np.clip(eta + offset, -700, 700))
            return y - mu, mu

        return newton_glm(A, gradient_and_weights), 1.0


def poisson(*, num_fixed: int = 0, beta_prior=None, site: str = "obs") -> PoissonLikelihood:
    """The Poisson family with a log link (``num_fixed = K`` unpooled fixed effects ``beta``)."""
    return PoissonLikelihood(num_fixed=num_fixed, beta_prior=beta_prior, site=site)
