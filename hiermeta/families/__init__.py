"""Task likelihoods ("families") for users' own data: one module per family.

Each family is a :class:`~hiermeta.TaskLikelihood` (NumPyro ``likelihood(theta, data)``,
``num_observations``, ``log_normaliser``, ``check``) with a data class that validates user input,
so every learner, NUTS and the predictive work on it unchanged.
"""

from .categorical import CategoricalData, CategoricalLikelihood  # noqa: F401
