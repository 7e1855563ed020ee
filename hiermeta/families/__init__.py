"""Task likelihoods ("families") for users' own data: one module per family.

Each family is a :class:`~hiermeta.tasks.TaskLikelihood` with a data class or ``make_data`` that
validates user input, so every learner, NUTS, type-II ML (exact, Laplace or quadrature) and the
predictive scores work on it unchanged: the GLM families are built from a design and a link
(docs/families.md), the categorical one from any network's logits (docs/fewshot.md).
"""

from .base import GLMData, GLMLikelihood  # noqa: F401
from .bernoulli import BernoulliLikelihood, bernoulli  # noqa: F401
from .binomial import BinomialLikelihood, binomial  # noqa: F401
from .categorical import CategoricalData, CategoricalLikelihood  # noqa: F401
from .gaussian import GaussianFamily, gaussian  # noqa: F401
from .poisson import PoissonLikelihood, poisson  # noqa: F401
from .student_t import StudentTLikelihood, student_t  # noqa: F401
