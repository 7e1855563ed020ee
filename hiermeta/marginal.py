"""Each task's marginal likelihood by the Laplace approximation or adaptive Gauss-Hermite quadrature:
a name kept for ``hiermeta.marginal``; the one implementation is :mod:`hiermeta.laplace`."""

from .laplace import (  # noqa: F401
    APPROXIMATIONS,
    MarginalInfo,
    approximate_log_marginal,
    check_approximation,
    compiled_marginal_info,
    marginal_info,
    quadrature_posterior,
)

__all__ = ["APPROXIMATIONS", "MarginalInfo", "approximate_log_marginal", "marginal_info", "compiled_marginal_info",
           "quadrature_posterior", "check_approximation"]
