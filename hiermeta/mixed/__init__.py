"""Mixed models in lme4's language: several grouping factors, crossed and nested, on NumPy/SciPy.

:mod:`~hiermeta.mixed.terms` holds the model (random-effect terms and their covariance
parameters), :mod:`~hiermeta.mixed.linalg` the penalised least-squares system every fit solves,
:mod:`~hiermeta.mixed.family` the GLM families and :mod:`~hiermeta.mixed.glmm` the GLMM fits
(PIRLS, Laplace, adaptive quadrature).
"""

from .family import get_family  # noqa: F401
from .glmm import fit_glmm  # noqa: F401
