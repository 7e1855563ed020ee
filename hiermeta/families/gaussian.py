"""The Gaussian family (identity link): :class:`~hiermeta.LinearGaussianLikelihood` with the
families' data convention, so a linear mixed model is built like the GLMs.

    y_{t,n} ~ N(eta_{t,n}, noise_sd^2),   eta_{t,n} = Z_{t,n} theta_t + X_{t,n} beta + offset

The noise sd is learned by default (a global parameter ``noise_sd``); the marginal likelihood and
the posterior of theta are closed form, so type-II ML is exact (and REML is available).
"""

from __future__ import annotations

import numpy as np

from ..linear_gaussian import LinearDesign, LinearGaussianLikelihood
from ..tasks import GaussianData

__all__ = ["GaussianFamily", "gaussian"]


class GaussianFamily(LinearGaussianLikelihood):
    """A linear-Gaussian likelihood whose data comes from :meth:`make_data` like the other families'."""

    name = "gaussian"
    discrete = False

    def make_data(self, response, mask=None, random=None, fixed=None, offset=None, task_covariates=None,
                  *, noise_sd=1.0) -> GaussianData:
        """``response`` ``(T, N)``, designs ``random`` ``(T, N, P)``, ``fixed`` ``(T, N, K)``,
        ``offset`` ``(T, N)`` as for the GLM families; ``noise_sd`` (broadcast to ``(T, N)``) the known
        sd, or the known relative scale when the noise is learned.  Returns :class:`~hiermeta.GaussianData`
        with one observation dimension."""
        y = np.asarray(response, dtype=float)
        if y.ndim != 2:
            raise ValueError(f"response must have shape (tasks, observations), got {y.shape}")
        if random is None:
            raise ValueError(f"random: the design of the task parameters, shape {y.shape + ('P',)}, is required")
        add_dim = lambda a: None if a is None else np.asarray(a, dtype=float)[:, :, None]
        try:
            noise = np.broadcast_to(np.asarray(noise_sd, dtype=float), y.shape)[..., None]
        except ValueError:
            raise ValueError(f"noise_sd of shape {np.shape(noise_sd)} does not broadcast to response {y.shape}") from None
        design = LinearDesign(add_dim(random), add_dim(fixed), add_dim(offset))
        return GaussianData.create(y[..., None], noise, inputs=design, mask=mask, task_covariates=task_covariates)


def gaussian(*, noise: str = "learned", num_fixed: int = 0, **kwargs) -> GaussianFamily:
    """The Gaussian family (identity link; ``noise="learned"`` or ``"known"``)."""
    return GaussianFamily(noise=noise, num_fixed=num_fixed, **kwargs)
