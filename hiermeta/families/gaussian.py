"""The Gaussian family (identity link): the linear-Gaussian likelihood
(:class:`~hiermeta.linear_gaussian.LinearGaussianLikelihood`) with its noise sd
learned by default, whose ``make_data(response, mask, random, fixed, offset, task_covariates,
noise_scale=None)`` takes the same per-group layout as the other families'.

    y_{t,n} ~ N(eta_{t,n}, noise_sd^2),   eta_{t,n} = Z_{t,n} theta_t + X_{t,n} beta + offset

The marginal likelihood and the posterior of theta are closed form, so type-II ML is exact (and
REML is available).
"""

from __future__ import annotations

from ..linear_gaussian import LinearGaussianLikelihood

__all__ = ["GaussianFamily", "gaussian"]

GaussianFamily = LinearGaussianLikelihood  # the family is the linear-Gaussian likelihood itself


def gaussian(*, noise: str = "learned", num_fixed: int = 0, **kwargs) -> LinearGaussianLikelihood:
    """The Gaussian family (identity link; ``noise="learned"`` or ``"known"``)."""
    return LinearGaussianLikelihood(noise=noise, num_fixed=num_fixed, **kwargs)
