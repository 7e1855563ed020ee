"""GLM families of the mixed-model engine, row by row, as documented data plus a small protocol.

A family says how a response ``y_i`` depends on its linear predictor ``eta_i`` (lme4's ``glmer``
families; the table follows bambi's family table).  ``w_i`` is the prior weight: the number of
trials of a binomial row (``y_i`` is then the *proportion* of successes, lme4's convention), a
frequency weight of a Poisson row.

=========  =====================  ==========================  =====================================================
family     links (first: default)  variance ``V(mu)``          log-likelihood of one row (with its constant)
=========  =====================  ==========================  =====================================================
binomial   logit, probit, cloglog  ``mu (1 - mu)``             ``log C(w, w y) + w y log mu + w (1 - y) log(1 - mu)``
bernoulli  logit, probit, cloglog  ``mu (1 - mu)``             binomial with ``w = 1`` (0/1 or boolean ``y``)
poisson    log                     ``mu``                      ``w (y log mu - mu - log y!)``
gaussian   identity                ``1``                       ``log N(y; mu, s^2 / w)`` (``s`` the residual sd)
=========  =====================  ==========================  =====================================================

The Gaussian row is here for the NumPyro model and the held-out scores (its fits are the linear
mixed model's, :mod:`hiermeta.mixed.lmm`); its functions take the residual sd as ``scale``, the
others ignore it.

Deviance residuals (the squared ones, summed: the deviance), with ``y log(y / mu) = 0`` at ``y = 0``:
binomial ``2 w [y log(y / mu) + (1 - y) log((1 - y) / (1 - mu))]``; Poisson ``2 w [y log(y / mu) - (y - mu)]``;
Gaussian ``w (y - mu)^2``.  A valid starting mean (R's ``mustart``): binomial ``(w y + 1/2) / (w + 1)``,
Poisson ``y + 1/10``, Gaussian ``y``.

The links, ``eta = g(mu)``, with their inverses and ``d mu / d eta`` (bounded as R's ``make.link``
bounds them, so ``mu`` stays strictly inside its range):

=======  ========================  ===========================  ==============================
link     ``g(mu)``                 ``g^-1(eta)``                ``d mu / d eta``
=======  ========================  ===========================  ==============================
logit    ``log(mu / (1 - mu))``    ``1 / (1 + e^-eta)``         ``mu (1 - mu)``
probit   ``Phi^-1(mu)``            ``Phi(eta)``                 ``phi(eta)``
cloglog  ``log(-log(1 - mu))``     ``1 - exp(-e^eta)``          ``e^eta exp(-e^eta)``
log      ``log mu``                ``e^eta``                    ``e^eta``
identity ``mu``                    ``eta``                      ``1``
=======  ========================  ===========================  ==============================

The protocol (:class:`Family`): ``prepare(response, weights)`` checks the data and returns them as
floats; ``link``/``inverse_link``/``mu_eta``/``variance``; ``deviance_residuals``,
``log_likelihood`` (row by row); ``start_mu``; and for scoring held-out rows ``cdf(k, mu, w)``
(the predictive CDF of the count ``k``: successes of a binomial row, the count of a Poisson row,
the value itself for a Gaussian row), ``counts(y, w)`` (the observed value ``k`` of each row) and
``discrete`` (randomise the PIT).  PIRLS (:mod:`hiermeta.mixed.glmm`) reads
only these.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import numpy as np
from scipy import special

from ..errors import DataDefectError

__all__ = ["Link", "LINKS", "Family", "Binomial", "Bernoulli", "Poisson", "Gaussian", "FAMILIES", "get_family"]

_EPS = np.finfo(float).eps
_LOGIT_BOUND = -np.log(_EPS)  # R's THRESH: exp(-36) is below machine precision relative to 1
_PROBIT_BOUND = -special.ndtri(_EPS)  # R: -qnorm(.Machine$double.eps) = 8.12


class Link(NamedTuple):
    """``eta = link(mu)``, ``mu = inverse(eta)``, ``mu_eta(eta) = d mu / d eta`` (NumPy ufunc-like)."""

    name: str
    link: Callable
    inverse: Callable
    mu_eta: Callable


def _logit_inverse(eta):
    return special.expit(np.clip(eta, -_LOGIT_BOUND, _LOGIT_BOUND))


def _logit_mu_eta(eta):
    mu = _logit_inverse(eta)
    return np.maximum(mu * (1.0 - mu), _EPS)


def _probit_inverse(eta):
    return special.ndtr(np.clip(eta, -_PROBIT_BOUND, _PROBIT_BOUND))


def _probit_mu_eta(eta):
    return np.maximum(np.exp(-0.5 * eta**2) / np.sqrt(2 * np.pi), _EPS)


def _cloglog_inverse(eta):
    return np.clip(-np.expm1(-np.exp(np.minimum(eta, 700.0))), _EPS, 1.0 - _EPS)


def _cloglog_mu_eta(eta):
    eta = np.minimum(eta, 700.0)
    return np.maximum(np.exp(eta - np.exp(eta)), _EPS)


def _log_inverse(eta):
    return np.maximum(np.exp(np.minimum(eta, 700.0)), _EPS)


LINKS = {
    "logit": Link("logit", special.logit, _logit_inverse, _logit_mu_eta),
    "probit": Link("probit", special.ndtri, _probit_inverse, _probit_mu_eta),
    "cloglog": Link("cloglog", lambda mu: np.log(-np.log1p(-mu)), _cloglog_inverse, _cloglog_mu_eta),
    "log": Link("log", np.log, _log_inverse, _log_inverse),
    "identity": Link("identity", lambda mu: np.asarray(mu, dtype=float), lambda eta: np.asarray(eta, dtype=float),
                     lambda eta: np.ones_like(np.asarray(eta, dtype=float))),
}


class Family:
    """A GLM family: its name, its link (:data:`LINKS`), and the row-by-row functions of the module table.

    Subclasses set ``name`` and ``links`` (allowed link names, the default first) and implement
    the functions below.
    """

    name: str = ""
    links: tuple = ()
    discrete: bool = True
    has_scale: bool = False  # a residual sd (Gaussian) enters the likelihood

    def __init__(self, link: Optional[str] = None):
        link = self.links[0] if link is None else str(link)
        if link not in self.links:
            raise ValueError(f"the {self.name} family takes the links {self.links}, got {link!r}")
        self.link = LINKS[link]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(link={self.link.name!r})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.link.name == other.link.name

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.link.name))

    @property
    def canonical(self) -> bool:
        """Is the link canonical (Fisher scoring is then Newton's method and PIRLS's weights are exact)?"""
        return self.link.name == self.links[0]

    # the link
    def inverse_link(self, eta):
        return self.link.inverse(np.asarray(eta, dtype=float))

    def mu_eta(self, eta):
        return self.link.mu_eta(np.asarray(eta, dtype=float))

    def _arrays(self, response, weights) -> tuple:
        """The response (booleans as 0/1) and the weights (default 1) as floats, finite responses checked."""
        y = np.asarray(response)
        y = np.asarray(y.astype(float) if y.dtype == bool else y, dtype=float)
        w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=float)
        if w.shape != y.shape:
            raise DataDefectError(f"{self.name}: {y.shape[0]} responses but weights of shape {w.shape}")
        bad = ~np.isfinite(y)
        if bad.any():
            raise DataDefectError(f"{self.name}: the response is missing or infinite on {int(bad.sum())} row(s) "
                                  f"(first rows {_first_rows(bad)})")
        return y, w

    # to implement
    def prepare(self, response, weights=None) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def variance(self, mu):  # pragma: no cover - abstract
        raise NotImplementedError

    def deviance_residuals(self, y, mu, w):  # pragma: no cover - abstract
        raise NotImplementedError

    def log_likelihood(self, y, mu, w, scale=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def start_mu(self, y, w):  # pragma: no cover - abstract
        raise NotImplementedError

    def counts(self, y, w):  # pragma: no cover - abstract
        raise NotImplementedError

    def cdf(self, k, mu, w, scale=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def is_binary(self, w) -> bool:
        """Are the rows single 0/1 outcomes (the Brier score applies)?"""
        return False

    def describe(self) -> str:
        return f"{self.name} ({self.link.name})"


def _first_rows(mask, values=None, limit: int = 3) -> str:
    idx = np.flatnonzero(mask)[:limit]
    if values is None:
        return ", ".join(str(int(i)) for i in idx)
    return ", ".join(f"{int(i)} ({values[i]:g})" for i in idx)


class Binomial(Family):
    """Successes out of ``w`` trials, ``y`` the proportion (lme4's convention for ``cbind(s, f)``).

    ``prepare`` accepts proportions with the trials as weights, or a 0/1 or boolean response with
    no weights (Bernoulli); it refuses proportions outside [0, 1] (successes above the trials),
    trials that are not positive integers, and non-integer successes ``w y``.
    """

    name = "binomial"
    links = ("logit", "probit", "cloglog")

    def prepare(self, response, weights=None) -> tuple:
        y, w = self._arrays(response, weights)
        bad = ~(np.isfinite(w) & (w > 0) & (np.abs(w - np.round(w)) <= 1e-8 * np.maximum(w, 1)))
        if bad.any():
            raise DataDefectError(f"{self.name}: the number of trials must be a positive integer on every row; "
                                  f"{int(bad.sum())} row(s) are not (first rows and values {_first_rows(bad, w)})")
        bad = (y < 0) | (y > 1)
        if bad.any():
            over = y > 1
            what = ("successes exceed the trials" if over.any() else "negative successes")
            raise DataDefectError(f"{self.name}: {what} on {int(bad.sum())} row(s): proportions "
                                  f"(successes / trials) must lie in [0, 1] (first rows and proportions "
                                  f"{_first_rows(bad, y)})")
        successes = w * y
        bad = np.abs(successes - np.round(successes)) > 1e-6 * np.maximum(w, 1)
        if bad.any():
            raise DataDefectError(f"{self.name}: non-integer numbers of successes (proportion x trials) on "
                                  f"{int(bad.sum())} row(s) (first rows and successes {_first_rows(bad, successes)})")
        return y, w

    def variance(self, mu):
        return mu * (1.0 - mu)

    def deviance_residuals(self, y, mu, w):
        return 2.0 * w * (special.xlogy(y, y / mu) + special.xlogy(1.0 - y, (1.0 - y) / (1.0 - mu)))

    def log_likelihood(self, y, mu, w, scale=None):
        k = np.round(w * y)
        const = special.gammaln(w + 1.0) - special.gammaln(k + 1.0) - special.gammaln(w - k + 1.0)
        return const + special.xlogy(k, mu) + special.xlog1py(w - k, -mu)

    def start_mu(self, y, w):
        return (w * y + 0.5) / (w + 1.0)

    def counts(self, y, w):
        return np.round(np.asarray(w) * np.asarray(y))

    def cdf(self, k, mu, w, scale=None):
        """``P(successes <= k)`` of a Binomial(``w``, ``mu``) row (0 below 0)."""
        from scipy import stats  # held-out scoring only: scipy.stats costs ~0.4 s to import

        return stats.binom.cdf(k, np.asarray(w), mu)

    def is_binary(self, w) -> bool:
        """All rows single trials (Bernoulli): the Brier score applies."""
        return bool(np.all(np.asarray(w) == 1))


class Bernoulli(Binomial):
    """The binomial family with one trial per row: a 0/1 or boolean response, no weights."""

    name = "bernoulli"

    def prepare(self, response, weights=None) -> tuple:
        if weights is not None and not np.all(np.asarray(weights) == 1):
            raise DataDefectError("bernoulli: one trial per row; use the binomial family for trials as weights")
        y = np.asarray(response, dtype=float)
        bad = np.isfinite(y) & (y != 0) & (y != 1)
        if bad.any():
            raise DataDefectError(f"bernoulli: the response must be 0/1 or boolean; {int(bad.sum())} row(s) are "
                                  f"not (first rows and values {_first_rows(bad, y)})")
        return super().prepare(response, None)


class Poisson(Family):
    """Counts ``y`` (non-negative integers), optional frequency weights ``w``."""

    name = "poisson"
    links = ("log",)

    def prepare(self, response, weights=None) -> tuple:
        y, w = self._arrays(response, weights)
        bad = (y < 0) | (np.abs(y - np.round(y)) > 1e-8 * np.maximum(np.abs(y), 1))
        if bad.any():
            raise DataDefectError(f"poisson: counts must be non-negative integers; {int(bad.sum())} row(s) are "
                                  f"not (first rows and values {_first_rows(bad, y)})")
        bad = ~(np.isfinite(w) & (w > 0))
        if bad.any():
            raise DataDefectError(f"poisson: weights must be positive and finite; {int(bad.sum())} row(s) are not")
        return np.round(y), w

    def variance(self, mu):
        return mu

    def deviance_residuals(self, y, mu, w):
        return 2.0 * w * (special.xlogy(y, y / mu) - (y - mu))

    def log_likelihood(self, y, mu, w, scale=None):
        return w * (special.xlogy(y, mu) - mu - special.gammaln(y + 1.0))

    def start_mu(self, y, w):
        return y + 0.1

    def counts(self, y, w):
        return np.asarray(y, dtype=float)

    def cdf(self, k, mu, w, scale=None):
        """``P(count <= k)`` of a Poisson(``mu``) row (frequency weights do not change one row's law)."""
        from scipy import stats  # held-out scoring only

        return stats.poisson.cdf(k, mu)


class Gaussian(Family):
    """``y ~ N(mu, s^2 / w)``: the linear mixed model's rows (fitted by :mod:`hiermeta.mixed.lmm`)."""

    name = "gaussian"
    links = ("identity",)
    discrete = False
    has_scale = True

    def prepare(self, response, weights=None) -> tuple:
        y, w = self._arrays(response, weights)
        bad = ~(np.isfinite(w) & (w > 0))
        if bad.any():
            raise DataDefectError(f"gaussian: weights must be positive and finite; {int(bad.sum())} row(s) are not")
        return y, w

    def variance(self, mu):
        return np.ones_like(np.asarray(mu, dtype=float))

    def deviance_residuals(self, y, mu, w):
        return w * (y - mu) ** 2

    def log_likelihood(self, y, mu, w, scale=None):
        if scale is None:
            raise ValueError("the Gaussian log-likelihood needs the residual sd (scale)")
        sd = scale / np.sqrt(w)
        return -0.5 * ((np.asarray(y) - mu) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2.0 * np.pi)

    def start_mu(self, y, w):
        return np.asarray(y, dtype=float)

    def counts(self, y, w):
        return np.asarray(y, dtype=float)

    def cdf(self, k, mu, w, scale=None):
        return special.ndtr((np.asarray(k) - mu) / (scale / np.sqrt(np.asarray(w))))


FAMILIES = {"binomial": Binomial, "bernoulli": Bernoulli, "poisson": Poisson, "gaussian": Gaussian}


def get_family(family: Union[str, Family], link: Optional[str] = None) -> Family:
    """A :class:`Family` from a name (``"binomial"``, ``"bernoulli"``, ``"poisson"``) and a link, or as given."""
    if isinstance(family, Family):
        if link is not None and link != family.link.name:
            raise ValueError(f"the family {family!r} already has the link {family.link.name!r}, got link={link!r}")
        return family
    name = str(family).lower()
    if name not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; the mixed-model GLMM families are {sorted(FAMILIES)}")
    return FAMILIES[name](link)
