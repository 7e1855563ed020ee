"""The Gaussian family (identity link): :class:`~hiermeta.linear_gaussian.LinearGaussianLikelihood`, whose
``make_data(response, mask, random, fixed, offset, task_covariates, noise_scale=None)`` takes the
same per-group layout as the other families'.

    y_{t,n} ~ N(eta_{t,n}, noise_sd^2),   eta_{t,n} = Z_{t,n} theta_t + X_{t,n} beta + offset

The noise sd is learned by default (a global parameter ``noise_sd``); the marginal likelihood and
the posterior of theta are closed form, so type-II ML is exact (and REML is available).
"""

from __future__ import annotations

from ..linear_gaussian import LinearGaussianLikelihood

__all__ = ["GaussianFamily", "gaussian"]


class GaussianFamily(LinearGaussianLikelihood):
    """A linear-Gaussian likelihood named like the other families (continuous, identity link)."""

    name = "gaussian"
    discrete = False
    binary = False


def gaussian(*, noise: str = "learned", num_fixed: int = 0, **kwargs) -> GaussianFamily:
    """The Gaussian family (identity link; ``noise="learned"`` or ``"known"``)."""
    return GaussianFamily(noise=noise, num_fixed=num_fixed, **kwargs)
