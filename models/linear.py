"""The linear-Gaussian domain (Experiment 1 of Chen et al., Appendix D) and its closed forms.

Observation n of task t, with a design matrix A_{t,n} (D x P) and known noise xi_{t,n} (D,):

    theta_t ~ N(phi, S),  S = diag(s^2)          (s: prior sd per coordinate, sigma[module])
    x_{t,n} ~ N(A_{t,n} theta_t, diag(xi_{t,n}^2))

The paper's instance: P = 8, D = 9, phi = 1, sigma = [8]*4 + [2]*4, xi = [8]*4 + [5]*4 + [1],
A = [I_8; 1^T / sqrt(8)] for every observation, 4 support + 4 query observations per task.

Everything is Gaussian, so with F_t = sum_n A^T Xi^-1 A and b_t = sum_n A^T Xi^-1 x_n:

    posterior       theta_t | D_t ~ N(m_t, Lambda_t^-1),  Lambda_t = S^-1 + F_t,
                                      m_t = Lambda_t^-1 (S^-1 phi + b_t)   (= the MAP)
    marginal        log p(D_t | phi, S) by Woodbury / the determinant lemma (P x P work)
    predictive      x* | D_t ~ N(A* m_t, A* Lambda_t^-1 A*^T + Xi*)

User data: :func:`make_data` (:meth:`hiermeta.GaussianData.from_design`) takes any design (shared
``(D, P)``, per task or per observation), noise that may differ per task or observation, and a
mask for unequal observation counts.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hiermeta import GaussianData, HierarchicalModel, ModulePartition, TaskBatch
from hiermeta.linear_gaussian import LinearGaussianLikelihood
from hiermeta.empirical_bayes import type2_ml
from hiermeta.tasks import merge_splits as _merge_splits
from hiermeta.utils import check_count

__all__ = [
    "LinearDomain",
    "paper_domain",
    "likelihood",
    "make_model",
    "make_data",
    "sample_tasks",
    "posterior",
    "log_marginal_likelihood",
    "posterior_predictive",
    "expected_loss",
    "expected_eq4_gradient",
    "fit_type2_ml",
    "reference_losses",
    "merge_splits",
    "posterior_given_sigma",
    "query_predictive",
    "expected_joint_map_gradient",
]


likelihood = LinearGaussianLikelihood()  # known noise; mean A theta (the design as inputs)


class LinearDomain(NamedTuple):
    """A linear-Gaussian task distribution with a shared design and noise."""

    phi: np.ndarray  # (P,)
    sigma: np.ndarray  # (P,) prior sd per coordinate
    design: np.ndarray  # (D, P)
    noise_sd: np.ndarray  # (D,)
    n_train: int
    n_val: int

    @property
    def num_params(self) -> int:
        return self.design.shape[1]


def paper_domain(n_train: int = 4, n_val: int = 4) -> LinearDomain:
    """Experiment 1 of the paper."""
    design = np.vstack([np.eye(8), np.ones((1, 8)) / np.sqrt(8.0)])
    return LinearDomain(
        phi=np.ones(8),
        sigma=np.array([8.0] * 4 + [2.0] * 4),
        design=design,
        noise_sd=np.array([8.0] * 4 + [5.0] * 4 + [1.0]),
        n_train=n_train,
        n_val=n_val,
    )


def make_model(num_params: int, partition: ModulePartition | None = None, **priors) -> HierarchicalModel:
    """Eq. 1 over ``theta`` in R^P; by default every coordinate is its own module (as the paper)."""
    if isinstance(num_params, bool) or not isinstance(num_params, (int, np.integer)) or num_params < 1:
        raise ValueError(f"num_params must be an integer >= 1, got {num_params!r}")
    if partition is not None and isinstance(partition, ModulePartition) and partition.num_params != num_params:
        raise ValueError(
            f"the partition covers {partition.num_params} parameters but the model has "
            f"num_params = {num_params}"
        )
    if partition is None:
        partition = ModulePartition.per_coordinate(jnp.zeros(num_params))
    return HierarchicalModel(likelihood, partition, **priors)


make_data = GaussianData.from_design  # user data: obs (T, N, D), design (D, P) or per task / observation, noise sd


merge_splits = jax.jit(_merge_splits)  # all observations of each task, for the marginal likelihood


def _gaussian_split(design, noise_sd, key, theta, n) -> GaussianData:
    T = theta.shape[0]
    D = design.shape[0]
    mean = theta @ design.T  # (T, D)
    noise = jnp.broadcast_to(noise_sd, (T, n, D))
    obs = mean[:, None, :] + noise * jax.random.normal(key, (T, n, D), theta.dtype)
    return GaussianData(obs=obs, noise_sd=noise, mask=jnp.ones((T, n), bool),
                        inputs=jnp.broadcast_to(design, (T, n) + design.shape))


@jax.jit(static_argnames=("num_tasks", "n_train", "n_val"))
def _sample_tasks(phi, sigma, design, noise_sd, key, num_tasks: int, n_train: int, n_val: int):
    """One compiled program per (num_tasks, split sizes, domain shape): the draws of :func:`sample_tasks`."""
    k_theta, k_train, k_val = jax.random.split(key, 3)
    theta = phi + sigma * jax.random.normal(k_theta, (num_tasks, phi.shape[0]), phi.dtype)
    batch = TaskBatch(
        train=_gaussian_split(design, noise_sd, k_train, theta, n_train),
        val=_gaussian_split(design, noise_sd, k_val, theta, n_val),
    )
    return theta, batch


def sample_tasks(domain: LinearDomain, key, num_tasks: int) -> tuple[jax.Array, TaskBatch]:
    """Draw ``num_tasks`` tasks from the model: ``theta_t ~ N(phi, diag(sigma^2))`` then data.

    Jittable (``num_tasks`` static); one compiled program per number of tasks when called outside
    ``jit``.  Returns the true ``theta`` ``(T, P)`` and the TaskBatch.
    """
    num_tasks = check_count(num_tasks, "num_tasks", 1)
    dtype = jnp.zeros(()).dtype
    arrays = [jnp.asarray(a, dtype) for a in (domain.phi, domain.sigma, domain.design, domain.noise_sd)]
    return _sample_tasks(*arrays, key, num_tasks=num_tasks, n_train=int(domain.n_train), n_val=int(domain.n_val))


# ---------------------------------------------------------------------------- closed forms


def posterior(data: GaussianData, phi, prior_sd):
    """Posterior of each task's theta: mean (= MAP) ``(T, P)`` and covariance ``(T, P, P)``.

    ``prior_sd`` may hold 0 (that coordinate fixed at phi) or, given as concrete values, ``inf`` (a
    flat prior on that coordinate: all ``inf`` is the MLE ``F^-1 sum_n A^T Xi^-1 x_n``), which takes the
    precision form ``Lambda = S^-1 + F`` (the Woodbury form of the likelihood multiplies inf by 0).
    """
    if not isinstance(prior_sd, jax.core.Tracer) and np.any(np.isinf(np.asarray(prior_sd))):
        return likelihood.posterior_from_precision(data, jnp.asarray(phi), jnp.asarray(prior_sd) ** -2.0)
    return likelihood.posterior(data, jnp.asarray(phi), jnp.diag(jnp.asarray(prior_sd)))


def log_marginal_likelihood(data: GaussianData, phi, prior_sd) -> jax.Array:
    """``log p(D_t | phi, S)`` per task ``(T,)``, theta integrated out exactly.

    -1/2 [ r^T Xi^-1 r - b^T Lambda^-1 b + log|Xi| + log|S| + log|Lambda| + n D log(2 pi) ],
    with r = x - A phi stacked over the task's observations and b = A^T Xi^-1 r
    (:meth:`hiermeta.linear_gaussian.LinearGaussianLikelihood.log_marginal`).
    """
    return likelihood.log_marginal(data, jnp.asarray(phi), jnp.diag(jnp.asarray(prior_sd)))


def posterior_predictive(data: GaussianData, phi, prior_sd, design_new, noise_new):
    """Predictive of a new observation of each task: mean ``(T, D*)``, covariance ``(T, D*, D*)``.

    ``design_new`` ``(D*, P)`` and ``noise_new`` ``(D*,)`` describe the new observation.
    """
    mean, cov = posterior(data, phi, prior_sd)
    A = jnp.asarray(design_new)
    pred_cov = jnp.einsum("dp,tpq,eq->tde", A, cov, A) + jnp.diag(jnp.asarray(noise_new) ** 2)
    return mean @ A.T, pred_cov


def expected_loss(domain: LinearDomain, phi_hat, sigma_hat) -> float:
    """Expected generalisation loss of the exact MAP under ``(phi_hat, sigma_hat)``.

    Expectation over new tasks from ``domain`` (its true phi, sigma), their ``n_train`` support
    observations, and a query observation; loss = 1/2 (x - A theta_hat)^T Xi^-1 (x - A theta_hat).
    With Lambda = S_hat^-1 + F, F = n_train A^T Xi^-1 A, and the estimation error
    e = Lambda^-1 (S_hat^-1 (phi_hat - theta) + noise term):

        E loss = 1/2 [ D + tr(A^T Xi^-1 A  E[e e^T]) ],
        E[e e^T] = Lambda^-1 [ S_hat^-1 (S + d d^T) S_hat^-1 + F ] Lambda^-1,  d = phi_hat - phi.

    ``sigma_hat = inf`` gives the unregularised MLE (1/2 (D + P / n_train)); the true values give
    the Bayes oracle (1/2 (D + tr(A^T Xi^-1 A Lambda^-1))).
    """
    A = np.asarray(domain.design, float)
    W = A.T @ np.diag(np.asarray(domain.noise_sd, float) ** -2) @ A
    F = domain.n_train * W
    prior_prec = np.broadcast_to(np.asarray(sigma_hat, float) ** -2.0, (A.shape[1],))
    Lam_inv = np.linalg.inv(np.diag(prior_prec) + F)
    d = np.asarray(phi_hat, float) - np.asarray(domain.phi, float)
    S_true = np.diag(np.asarray(domain.sigma, float) ** 2)
    middle = np.diag(prior_prec) @ (S_true + np.outer(d, d)) @ np.diag(prior_prec) + F
    err = Lam_inv @ middle @ Lam_inv
    return float(0.5 * (A.shape[0] + np.trace(W @ err)))


def expected_eq4_gradient(domain: LinearDomain, sigma_hat) -> np.ndarray:
    """Expectation of the Eq. 4 sigma-gradient per coordinate, E[(theta_hat - phi) * g], at phi_hat = phi.

    With u = theta - phi ~ N(0, S), b = F u + e (e ~ N(0, F)) so that theta_hat - phi = Lambda^-1 b,
    and g = F_val (theta - theta_hat) + (query noise), F_val = n_val A^T Xi^-1 A:

        E[(theta_hat - phi) * g] = diag( Lambda^-1 F S F_val - Lambda^-1 (F S F + F) Lambda^-1 F_val ).

    Its root in sigma_hat is the fixed point Algorithm 1 converges to (for M-Shrinkage on the
    paper's domain: the true sigma).  Summing over coordinates gives the shared-sigma gradient.
    """
    A = np.asarray(domain.design, float)
    W = A.T @ np.diag(np.asarray(domain.noise_sd, float) ** -2) @ A
    F, F_val = domain.n_train * W, domain.n_val * W
    S = np.diag(np.asarray(domain.sigma, float) ** 2)
    prior_prec = np.broadcast_to(np.asarray(sigma_hat, float) ** -2.0, (A.shape[1],))
    Lam_inv = np.linalg.inv(np.diag(prior_prec) + F)
    return np.diag(Lam_inv @ F @ S @ F_val - Lam_inv @ (F @ S @ F + F) @ Lam_inv @ F_val)


def fit_type2_ml(data: GaussianData, model: HierarchicalModel, phi0=None, sigma0=None, **kwargs):
    """Exact empirical Bayes: maximise ``sum_t log p(D_t | phi, sigma)`` over phi and per-module sigma
    (:func:`hiermeta.type2_ml`; ``phi0``, ``sigma0`` override its data-scaled start)."""
    init = {}
    if phi0 is not None:
        init["phi"] = phi0
    if sigma0 is not None:
        init["sigma"] = sigma0
    return type2_ml(model, data, init=init, **kwargs)


@jax.jit(static_argnums=0)
def reference_losses(model: HierarchicalModel, tasks: TaskBatch, phi, sigma):
    """The generalisation loss of the exact estimators on each task ``(T,)`` twice: the Bayes oracle
    (posterior mean under the true ``phi``, ``sigma``) and the MLE (``sigma = inf``, flat prior).
    One compiled program per model and task shape."""
    oracle_mean, _ = posterior(tasks.train, phi, sigma)
    mle_mean, _ = likelihood.posterior_from_precision(tasks.train, phi, jnp.zeros(jnp.shape(sigma)))
    task_loss = jax.vmap(model.generalisation_loss)
    return task_loss(oracle_mean, tasks.val), task_loss(mle_mean, tasks.val)


# ---------------------------------------------------------------------------- for hiermeta.posterior


def posterior_given_sigma(data: GaussianData, prior_sd, phi_prior_mean=None, phi_prior_sd=None):
    """Exact joint posterior of phi and every theta_t at a fixed prior sd ``S = diag(prior_sd^2)``.

    With phi ~ N(m0, V0) (flat when ``phi_prior_sd`` is None), integrating theta_t out gives task t's
    contribution to phi's precision and linear term (Lambda_t = S^-1 + F_t, g_t = sum_n A^T Xi^-1 x_n):

        K_t = S^-1 - S^-1 Lambda_t^-1 S^-1,      h_t = S^-1 Lambda_t^-1 g_t,
        phi | D ~ N(V (V0^-1 m0 + sum_t h_t), V),   V = (V0^-1 + sum_t K_t)^-1,
        theta_t | D ~ N(Lambda_t^-1 (S^-1 E[phi] + g_t),  Lambda_t^-1 + Lambda_t^-1 S^-1 V S^-1 Lambda_t^-1).

    Returns ``(phi_mean (P,), phi_cov (P, P), theta_mean (T, P), theta_cov (T, P, P))``.
    """
    s_inv = jnp.diag(jnp.asarray(prior_sd, dtype=float) ** -2.0)
    P = s_inv.shape[0]
    F, g = likelihood._sufficient(data, jnp.zeros(P), None)[:2]
    lam_inv = jnp.linalg.inv(F + s_inv)
    K = s_inv - s_inv @ lam_inv @ s_inv  # (T, P, P)
    h = jnp.einsum("pq,tqr,tr->tp", s_inv, lam_inv, g)
    prec, lin = jnp.sum(K, axis=0), jnp.sum(h, axis=0)
    if phi_prior_sd is not None:
        v0_inv = jnp.diag(jnp.broadcast_to(jnp.asarray(phi_prior_sd, dtype=float) ** -2.0, (P,)))
        m0 = jnp.zeros(P) if phi_prior_mean is None else jnp.broadcast_to(jnp.asarray(phi_prior_mean, dtype=float), (P,))
        prec, lin = prec + v0_inv, lin + v0_inv @ m0
    phi_cov = jnp.linalg.inv(prec)
    phi_cov = 0.5 * (phi_cov + phi_cov.T)
    phi_mean = phi_cov @ lin
    theta_mean = jnp.einsum("tpq,tq->tp", lam_inv, s_inv @ phi_mean + g)
    gain = jnp.einsum("tpq,qr->tpr", lam_inv, s_inv)  # d E[theta_t | phi] / d phi
    theta_cov = lam_inv + jnp.einsum("tpq,qr,tsr->tps", gain, phi_cov, gain)
    return phi_mean, phi_cov, theta_mean, 0.5 * (theta_cov + jnp.swapaxes(theta_cov, -1, -2))


def query_predictive(train: GaussianData, val: GaussianData, phi, prior_sd):
    """Exact predictive of each task's query data given its support, at fixed ``phi``, ``prior_sd``.

    Returns ``(log_pred (T,), log_evidence (T,), mean (T, N, D), sd (T, N, D))``: the joint
    ``log p(D^val_t | D^tr_t) = log p(D^tr_t, D^val_t) - log p(D^tr_t)``, the support's log marginal
    ``log p(D^tr_t | phi, S)``, and the marginal predictive mean and sd of every query scalar
    (``A m_t`` and ``sqrt(diag(A Lambda_t^-1 A^T) + xi^2)``).
    """
    return likelihood.predictive(train, val, jnp.asarray(phi), jnp.diag(jnp.asarray(prior_sd)))


def expected_joint_map_gradient(domain: LinearDomain, sigma_hat) -> np.ndarray:
    """Expected joint-MAP gradient in rho_m = log sigma_m^2, per coordinate, as T -> inf (phi_hat = phi).

    The joint MAP maximises sum_t [log N(theta_t | phi, S_hat) + log p(D_t^tr | theta_t)]; at the
    inner optimum (envelope theorem) its rho-gradient per task is ((theta_hat - phi)^2 / sigma_hat^2 - 1) / 2
    with E[(theta_hat - phi)(theta_hat - phi)^T] = Lambda^-1 (F S F + F) Lambda^-1.  Its root is the
    asymptotic joint-MAP sigma; in one dimension it is Eq. 10 of the paper.
    """
    A = np.asarray(domain.design, float)
    F = domain.n_train * (A.T @ np.diag(np.asarray(domain.noise_sd, float) ** -2) @ A)
    S = np.diag(np.asarray(domain.sigma, float) ** 2)
    s2_hat = np.broadcast_to(np.asarray(sigma_hat, float) ** 2.0, (A.shape[1],))
    lam_inv = np.linalg.inv(np.diag(1.0 / s2_hat) + F)
    second = np.diag(lam_inv @ (F @ S @ F + F) @ lam_inv)
    return 0.5 * (second / s2_hat - 1.0)
