"""The non-linear "swirl" domain (Experiment 2 of Chen et al., Appendix D).

Each consecutive non-overlapping pair (d, d+1) of theta in R^P (P even) is rotated by an angle
proportional to its radius:

    r_d            = sqrt(theta_d^2 + theta_{d+1}^2)
    [mu_d, mu_d+1] = Rot(omega r_d) [theta_d, theta_d+1],   Rot(a) = [[cos a, -sin a], [sin a, cos a]]
    theta_t ~ N(phi, diag(sigma^2)),   x_{t,n} ~ N(mu(theta_t), diag(xi^2))

The paper's instance: P = D = 10, phi = 2, sigma = [4]*8 + [8]*2, xi = 10, omega = pi/5,
5 support + 5 query observations per task.

The map theta -> mu is a volume-preserving bijection (the radius is kept, so the inverse rotates by
-omega r), so the maximum-likelihood estimate is closed form: mu_hat is the (noise-weighted) mean
of a task's observations and theta_MLE = unswirl(mu_hat).  Its expected generalisation loss is
1/2 (D + sum_d 1/n_train) = 6 on the paper's domain.  The Bayes oracle (the MAP under the true
prior) has no closed form, and L_t is multimodal; :func:`oracle` finds the global MAP pair by pair
(L_t is a sum over the pairs) on a lattice polished by Newton steps, and the posterior mean of mu.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hiermeta import GaussianData, GaussianLikelihood, HierarchicalModel, ModulePartition, TaskBatch
from hiermeta.laplace import levenberg_marquardt

__all__ = [
    "SwirlDomain",
    "paper_domain",
    "swirl",
    "unswirl",
    "likelihood",
    "make_model",
    "sample_tasks",
    "mle",
    "mle_expected_loss",
    "oracle",
    "Oracle",
    "reference_losses",
    "grid_predictive",
    "GridPredictive",
]

OMEGA = np.pi / 5


def _radius(pairs):
    """``sqrt(a^2 + b^2)`` per pair, with a finite (zero) gradient at the origin."""
    r2 = jnp.sum(pairs**2, axis=-1)
    positive = r2 > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, r2, 1.0)), 0.0)


def _rotate(theta, omega):
    pairs = theta.reshape(theta.shape[:-1] + (-1, 2))
    angle = omega * _radius(pairs)
    c, s = jnp.cos(angle), jnp.sin(angle)
    a, b = pairs[..., 0], pairs[..., 1]
    return jnp.stack([c * a - s * b, s * a + c * b], axis=-1).reshape(theta.shape)


def swirl(theta, omega=OMEGA):
    """``mu(theta)``: each pair (d, d+1) rotated by ``omega * r_d`` (any leading axes, last axis even).

    Smooth everywhere, the origin included (where the gradient is the identity).
    """
    if theta.shape[-1] % 2:
        raise ValueError(f"the swirl acts on pairs of coordinates: the last axis must be even, got {theta.shape}")
    return _rotate(theta, omega)


def unswirl(mu, omega=OMEGA):
    """The inverse of :func:`swirl`: the radius is unchanged, so rotate back by ``-omega r``."""
    if mu.shape[-1] % 2:
        raise ValueError(f"the swirl acts on pairs of coordinates: the last axis must be even, got {mu.shape}")
    return _rotate(mu, -omega)


class SwirlDomain(NamedTuple):
    """A swirl task distribution."""

    phi: np.ndarray  # (P,)
    sigma: np.ndarray  # (P,) prior sd per coordinate
    noise_sd: np.ndarray  # (P,) observation noise sd (D = P)
    omega: float
    n_train: int
    n_val: int

    @property
    def num_params(self) -> int:
        return int(np.shape(self.phi)[0])


def paper_domain(n_train: int = 5, n_val: int = 5) -> SwirlDomain:
    """Experiment 2 of the paper."""
    return SwirlDomain(
        phi=np.full(10, 2.0),
        sigma=np.array([4.0] * 8 + [8.0] * 2),
        noise_sd=np.full(10, 10.0),
        omega=OMEGA,
        n_train=n_train,
        n_val=n_val,
    )


def make_likelihood(omega: float = OMEGA) -> GaussianLikelihood:
    """``x_{t,n} ~ N(swirl(theta_t), diag(xi^2))``: one mean ``(D,)`` shared by a task's observations."""
    return GaussianLikelihood(lambda theta, inputs: swirl(theta, omega))


likelihood = make_likelihood()


def make_model(domain: SwirlDomain | None = None, partition: ModulePartition | None = None, **priors):
    """Eq. 1 over ``theta`` in R^P; by default every coordinate is its own module (as the paper)."""
    domain = paper_domain() if domain is None else domain
    if partition is None:
        partition = ModulePartition.per_coordinate(jnp.zeros(domain.num_params))
    lik = likelihood if domain.omega == OMEGA else make_likelihood(domain.omega)
    return HierarchicalModel(lik, partition, **priors)


def _split(domain: SwirlDomain, key, theta, n) -> GaussianData:
    T, D = theta.shape
    mean = swirl(theta, domain.omega)
    noise = jnp.broadcast_to(jnp.asarray(domain.noise_sd, theta.dtype), (T, n, D))
    obs = mean[:, None, :] + noise * jax.random.normal(key, (T, n, D), theta.dtype)
    return GaussianData(obs=obs, noise_sd=noise, mask=jnp.ones((T, n), bool), inputs=None)


def sample_tasks(domain: SwirlDomain, key, num_tasks: int) -> tuple[jax.Array, TaskBatch]:
    """Draw ``num_tasks`` tasks: ``theta_t ~ N(phi, diag(sigma^2))``, then support and query data.

    Jittable (``num_tasks`` static).  Returns the true ``theta`` ``(T, P)`` and the TaskBatch.
    """
    k_theta, k_train, k_val = jax.random.split(key, 3)
    dtype = jnp.zeros(()).dtype
    phi = jnp.asarray(domain.phi, dtype)
    theta = phi + jnp.asarray(domain.sigma, dtype) * jax.random.normal(k_theta, (num_tasks, phi.shape[0]), dtype)
    batch = TaskBatch(train=_split(domain, k_train, theta, domain.n_train),
                      val=_split(domain, k_val, theta, domain.n_val))
    return theta, batch


# ---------------------------------------------------------------------------- references


def mle(data: GaussianData, omega: float = OMEGA) -> jax.Array:
    """Maximum-likelihood theta per task ``(T, P)``: unswirl the noise-weighted mean observation."""
    w = jnp.where(data.mask[..., None], data.noise_sd**-2, 0.0)
    mu_hat = jnp.sum(w * data.obs, axis=1) / jnp.sum(w, axis=1)
    return unswirl(mu_hat, omega)


def mle_expected_loss(domain: SwirlDomain) -> float:
    """Expected generalisation loss of the MLE: ``1/2 (D + D / n_train)`` (mu_hat has variance xi^2 / n)."""
    D = domain.num_params
    return 0.5 * (D + D / domain.n_train)


class Oracle(NamedTuple):
    """Bayes-oracle estimates of each task under a given prior (see :func:`oracle`)."""

    theta_map: jax.Array  # (T, P) the global MAP (maximum a posteriori) theta
    objective: jax.Array  # (T,) L_t at theta_map
    grad_norm: jax.Array  # (T,) max |grad L_t| at theta_map (convergence check)
    mu_mean: jax.Array  # (T, P) posterior mean of mu(theta): the Bayes-optimal prediction
    local_map: jax.Array  # (T, P) the local MAP that descent from phi reaches
    local_objective: jax.Array  # (T,) L_t at local_map


def _damped_newton(loss, start, data_t, num_steps):
    """Levenberg-Marquardt on ``loss(., data_t)`` (lam starts at 1, /= 3 after a success, *= 3 after a
    failure; a step must strictly lower the loss), so it descends to a local minimum."""
    return levenberg_marquardt(lambda theta: loss(theta, data_t), start, num_steps, damping=1.0,
                               shrink=1.0 / 3.0, grow=3.0, strict=True)


def _pair_grid_posterior(xbar, prec, phi, sigma, omega, half_width, grid):
    """One pair of one task on a ``grid x grid`` lattice over ``phi +- half_width``: the lattice
    point of highest posterior density and the posterior mean of mu (rectangle rule)."""
    axis = jnp.linspace(-1.0, 1.0, grid, dtype=phi.dtype) * half_width
    a, b = jnp.meshgrid(phi[0] + axis, phi[1] + axis, indexing="ij")
    pts = jnp.stack([a.ravel(), b.ravel()], axis=-1)  # (G^2, 2)
    mu = _rotate(pts, omega)
    log_post = -0.5 * jnp.sum(((pts - phi) / sigma) ** 2 + prec * (xbar - mu) ** 2, axis=-1)
    weights = jax.nn.softmax(log_post)
    return pts[jnp.argmax(log_post)], weights @ mu


def oracle(model: HierarchicalModel, data: GaussianData, phi, sigma, *, omega: float = OMEGA,
           grid: int = 257, width: float = 6.0, newton_steps: int = 100) -> Oracle:
    """The Bayes oracle under the prior ``N(phi, diag(sigma^2))`` (per coordinate), for each task.

    ``L_t`` (Eq. 2) is a sum over the coordinate pairs, each a 2-D problem, and it is multimodal
    (the swirl's arms), so descent from one start is not enough.  Per pair, the posterior is
    evaluated on a ``grid x grid`` lattice over ``phi +- width * max(sigma_pair)``; its best point
    (and, as further starts, phi and the MLE) are polished by damped Newton steps on the full
    ``L_t`` (``model.inner_objective``) and the lowest end point is the global MAP.  The same
    lattice gives the posterior mean of ``mu(theta)``, the Bayes-optimal prediction under squared
    error.  ``local_map`` is the minimum that descent from phi reaches (what inner loops find).
    """
    phi = jnp.asarray(phi)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, phi.dtype), phi.shape)
    P = phi.shape[0]
    loss = lambda theta, data_t: model.inner_objective(theta, phi, sigma, data_t)
    polish = lambda data_t, start: _damped_newton(loss, start, data_t, newton_steps)

    w = jnp.where(data.mask[..., None], data.noise_sd**-2, 0.0)
    prec = jnp.sum(w, axis=1)  # (T, P): precision of the mean observation
    xbar = jnp.sum(w * data.obs, axis=1) / prec
    phi2, sigma2 = phi.reshape(-1, 2), sigma.reshape(-1, 2)
    half = width * jnp.max(sigma2, axis=-1)

    def task(args):
        xbar_t, prec_t = args
        best, mu_mean = jax.vmap(_pair_grid_posterior, in_axes=(0, 0, 0, 0, None, 0, None))(
            xbar_t.reshape(-1, 2), prec_t.reshape(-1, 2), phi2, sigma2, omega, half, grid)
        return best.reshape(P), mu_mean.reshape(P)

    grid_best, mu_mean = jax.lax.map(task, (xbar, prec), batch_size=8)
    starts = jnp.stack([grid_best, jnp.broadcast_to(phi, grid_best.shape), unswirl(xbar, omega)])  # (3, T, P)
    thetas, values = jax.vmap(lambda s: jax.vmap(polish)(data, s))(starts)
    best = jnp.argmin(values, axis=0)  # (T,)
    theta = jnp.take_along_axis(thetas, best[None, :, None], axis=0)[0]
    grads = jax.vmap(jax.grad(loss))(theta, data)
    return Oracle(
        theta_map=theta,
        objective=jnp.min(values, axis=0),
        grad_norm=jnp.max(jnp.abs(grads), axis=-1),
        mu_mean=mu_mean,
        local_map=thetas[1],
        local_objective=values[1],
    )


class GridPredictive(NamedTuple):
    """A new task's exact posterior predictive under a prior (see :func:`grid_predictive`)."""

    log_pred: jax.Array  # (T,) log p(D^val_t | D^tr_t, phi, sigma), joint over the query data
    pit: jax.Array  # (T, N, D) predictive CDF at every query scalar (NaN at padding)
    log_evidence: jax.Array  # (T,) log p(D^tr_t | phi, sigma)


def _noise(data: GaussianData):
    sd = data.noise_sd
    return jnp.broadcast_to(sd if sd.ndim == 3 else sd[:, None, :], data.obs.shape)


def _pair_predictive(sup_obs, sup_sd, sup_mask, q_obs, q_sd, q_mask, phi, sigma, omega, half_width, grid):
    """One pair of one task: posterior on a ``grid x grid`` lattice of theta (rectangle rule), the
    support's log evidence, the query's joint log predictive, and the PIT of each query scalar."""
    axis = jnp.linspace(-1.0, 1.0, grid, dtype=phi.dtype) * half_width
    a, b = jnp.meshgrid(phi[0] + axis, phi[1] + axis, indexing="ij")
    pts = jnp.stack([a.ravel(), b.ravel()], axis=-1)  # (G^2, 2)
    mu = _rotate(pts, omega)
    cell = jnp.log(axis[1] - axis[0]) * 2
    log_prior = jnp.sum(-0.5 * ((pts - phi) / sigma) ** 2 - jnp.log(sigma) - 0.5 * jnp.log(2 * jnp.pi), -1)

    def log_lik(obs, sd, mask):  # (N, 2) data -> (G^2,)
        z = (obs[None] - mu[:, None]) / sd[None]
        per = -0.5 * z**2 - jnp.log(sd[None]) - 0.5 * jnp.log(2 * jnp.pi)
        return jnp.sum(jnp.where(mask[None, :, None], per, 0.0), axis=(1, 2))

    joint = log_prior + log_lik(sup_obs, sup_sd, sup_mask) + cell
    log_ev = jax.scipy.special.logsumexp(joint)
    log_w = joint - log_ev
    log_pred = jax.scipy.special.logsumexp(log_w + log_lik(q_obs, q_sd, q_mask))
    cdf = jax.scipy.special.ndtr((q_obs[None] - mu[:, None]) / q_sd[None])  # (G^2, N, 2)
    pit = jnp.einsum("g,gnd->nd", jnp.exp(log_w), cdf)
    return log_ev, log_pred, jnp.where(q_mask[:, None], pit, jnp.nan)


def grid_predictive(support: GaussianData, query: GaussianData, phi, sigma, *, omega: float = OMEGA,
                    grid: int = 257, width: float = 6.0) -> GridPredictive:
    """The exact posterior predictive of each task's query data given its support, under the prior
    ``theta ~ N(phi, diag(sigma^2))`` (level (b) of ``examples/map_vs_posterior.py``).

    The likelihood and the prior factorise over the coordinate pairs, so per pair
    ``p(D^val | D^tr) = sum_g w_g p(D^val | theta_g)`` over a ``grid x grid`` lattice of theta over
    ``phi +- width * max(sigma_pair)``, with ``w_g`` proportional to ``N(theta_g | phi, sigma^2)
    p(D^tr | theta_g)`` (the rectangle rule, exact up to the lattice: the integrand is smooth and
    the prior's mass beyond ``width`` sigmas is negligible); the same sum gives the support's
    evidence ``p(D^tr | phi, sigma)`` (products over pairs).  Returns log predictive, PIT and log
    evidence per task; :func:`jax.lax.map` over tasks keeps memory at one task's lattice.
    """
    phi = jnp.asarray(phi)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, phi.dtype), phi.shape)
    P = phi.shape[0]
    if P % 2:
        raise ValueError(f"the swirl acts on pairs of coordinates: phi must have an even length, got {P}")
    pairs = lambda x: jnp.moveaxis(x.reshape(x.shape[:-1] + (P // 2, 2)), -2, 0)  # (..., P) -> (P/2, ..., 2)
    phi2, sigma2 = phi.reshape(-1, 2), sigma.reshape(-1, 2)
    half = width * jnp.max(sigma2, axis=-1)

    def task(args):
        so, ss, sm, qo, qs, qm = args
        per_pair = jax.vmap(_pair_predictive, in_axes=(0, 0, None, 0, 0, None, 0, 0, None, 0, None))
        log_ev, log_pred, pit = per_pair(pairs(so), pairs(ss), sm, pairs(qo), pairs(qs), qm, phi2, sigma2, omega,
                                         half, grid)
        return jnp.sum(log_ev), jnp.sum(log_pred), jnp.moveaxis(pit, 0, -2).reshape(qo.shape)

    log_ev, log_pred, pit = jax.lax.map(task, (support.obs, _noise(support), support.mask,
                                               query.obs, _noise(query), query.mask))
    return GridPredictive(log_pred=log_pred, pit=pit, log_evidence=log_ev)


def reference_losses(model: HierarchicalModel, domain: SwirlDomain, tasks: TaskBatch, **oracle_kwargs) -> dict:
    """Per-task generalisation losses ``(T,)`` of the reference estimators on ``tasks``.

    ``"oracle_map"``: the global MAP under the true prior (the Bayes oracle of the paper);
    ``"local_map"``: the MAP that descent from the true phi reaches (an inner loop's limit at the
    true phi, sigma); ``"posterior_mean"``: the posterior mean of mu, the Bayes-optimal prediction;
    ``"mle"``: the maximum-likelihood estimate; ``"map_phi_offset"``: ``mean_t (theta_hat_t - phi)``
    for the global and the local MAP (the MAP phi-step at the truth, zero iff the true phi is its
    fixed point; the oracle's ``grad_norm`` max is ``"oracle_grad_norm"``).  Losses come from ``model.generalisation_loss``
    (the posterior mean of mu as the parameter ``unswirl(mu)``, the swirl being a bijection).
    """
    result = jax.jit(lambda d: oracle(model, d, domain.phi, domain.sigma, omega=domain.omega, **oracle_kwargs))(
        tasks.train)
    loss = jax.jit(jax.vmap(model.generalisation_loss))
    thetas = {
        "oracle_map": result.theta_map,
        "local_map": result.local_map,
        "posterior_mean": unswirl(result.mu_mean, domain.omega),
        "mle": mle(tasks.train, domain.omega),
    }
    out = {name: np.asarray(loss(theta, tasks.val)) for name, theta in thetas.items()}
    out["oracle_grad_norm"] = float(jnp.max(result.grad_norm))
    # the MAP phi-step of Algorithm 1 at the truth, mean_t (theta_hat_t - phi): zero iff phi is its fixed point
    out["map_phi_offset"] = {"oracle_map": np.asarray(jnp.mean(result.theta_map - domain.phi, axis=0)),
                             "local_map": np.asarray(jnp.mean(result.local_map - domain.phi, axis=0))}
    return out
