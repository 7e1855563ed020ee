"""The binomial family (logit link): successes out of a known number of trials per observation.

    y_{t,n} ~ Binomial(n_{t,n}, p_{t,n}),   logit p_{t,n} = eta_{t,n} = Z_{t,n} theta_t + X_{t,n} beta + offset

(lme4's ``glmer(cbind(y, n - y) ~ x + (1 | g), family = binomial)``).  ``log p`` includes the
binomial coefficient ``log C(n, y)`` (so log-likelihoods match lme4's and glm's), which
:meth:`log_normaliser` returns for the generalisation loss.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import betainc, gammaln

from .base import GLMData, GLMLikelihood, newton_glm

__all__ = ["BinomialLikelihood", "binomial", "check_counts", "logit_pooled_fit"]


def check_counts(values: np.ndarray, name: str, where: str) -> None:
    """Observed ``values`` must be non-negative integers (a ``ValueError`` naming ``name`` otherwise)."""
    if values.size and (np.any(values < 0) or np.any(values != np.round(values))):
        bad = values[(values < 0) | (values != np.round(values))]
        raise ValueError(f"{where}: {name} must be non-negative integer counts, got {bad[:5].tolist()}")


def logit_pooled_fit(A, successes, trials, offset):
    """Pooled logistic regression of ``successes`` out of ``trials`` on the columns ``A`` (Newton)."""

    def gradient_and_weights(eta):
        p = 1.0 / (1.0 + np.exp(-(eta + offset)))
        return successes - trials * p, trials * p * (1.0 - p)

    return newton_glm(A, gradient_and_weights)


class BinomialLikelihood(GLMLikelihood):
    """Binomial observations with a logit link; see the module docstring and :class:`GLMLikelihood`."""

    name = "binomial"
    discrete = True
    takes_trials = True

    def distribution(self, eta, data: GLMData, g: Optional[Mapping[str, Any]] = None):
        return dist.BinomialLogits(logits=eta, total_count=data.trials)

    def cdf_from_eta(self, eta, data: GLMData, value, g=None):
        """``P(y <= k) = I_{1-p}(n - k, k + 1)`` (the regularised incomplete beta function)."""
        n, k = data.trials, jnp.floor(value)
        inside = (k >= 0) & (k < n)
        q = 1.0 / (1.0 + jnp.exp(eta))  # 1 - p
        a, b = jnp.where(inside, n - k, 1.0), jnp.where(inside, k + 1.0, 1.0)
        return jnp.where(k < 0, 0.0, jnp.where(k >= n, 1.0, betainc(a, b, q)))

    def log_normaliser(self, data: GLMData):
        """``sum_n log C(n_{t,n}, y_{t,n})`` per task."""
        n, y = data.trials, data.response
        log_choose = gammaln(n + 1.0) - gammaln(y + 1.0) - gammaln(n - y + 1.0)
        return jnp.sum(jnp.where(data.mask, log_choose, 0.0), axis=-1)

    def make_data(self, response, mask=None, random=None, fixed=None, offset=None, task_covariates=None,
                  *, trials=None) -> GLMData:
        """:meth:`GLMLikelihood.make_data` with ``trials`` ``(T, N)`` (broadcast), the number of trials
        of each observation: positive integers, with ``0 <= response <= trials`` (successes)."""
        if trials is None:
            raise ValueError("trials: the binomial family needs the number of trials of every observation")
        y = np.asarray(response)
        try:
            trials = np.broadcast_to(np.asarray(trials), y.shape)
        except ValueError:
            raise ValueError(f"trials of shape {np.shape(trials)} do not broadcast to response {y.shape}") from None
        data = self._assemble(response, mask, random, fixed, offset, task_covariates, trials=trials)
        return self._validated(data)

    def _check_family(self, data: GLMData, where: str, observed: np.ndarray) -> None:
        y = np.asarray(data.response)[observed]
        n = np.asarray(data.trials)[observed]
        check_counts(y, "response (successes)", where)
        if not np.all(np.isfinite(n)) or np.any(n < 1) or np.any(n != np.round(n)):
            raise ValueError(f"{where}: trials must be positive integers, got {n[(n < 1) | (n != np.round(n))][:5].tolist()}")
        above = y > n
        if np.any(above):
            raise ValueError(f"{where}: successes exceed trials in {int(above.sum())} observation(s), "
                             f"e.g. {y[above][0]:g} successes out of {n[above][0]:g} trials")

    def _pooled_fit(self, A, data, observed, offset):
        y = np.asarray(data.response, float)[observed]
        n = np.asarray(data.trials, float)[observed]
        return logit_pooled_fit(A, y, n, offset), 1.0


def binomial(*, num_fixed: int = 0, beta_prior=None, site: str = "obs") -> BinomialLikelihood:
    """The binomial family with a logit link (``num_fixed = K`` unpooled fixed effects ``beta``)."""
    return BinomialLikelihood(num_fixed=num_fixed, beta_prior=beta_prior, site=site)
