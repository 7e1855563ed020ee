"""Mixed models in lme4's language: several grouping factors, crossed and nested, on NumPy/SciPy.

:mod:`~hiermeta.mixed.terms` holds the model (random-effect terms and their covariance
parameters), :mod:`~hiermeta.mixed.linalg` the penalised least-squares system every fit solves.
"""
