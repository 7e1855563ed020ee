"""The inner-step count K pinned at small K against explicit iterates written out by hand.

The step-level exact tests elsewhere use converged inner loops, where K - 1 and K steps agree; here
K = 3 steps of plain gradient descent are written as a Python loop with hand-derived gradients of
the linear-Gaussian objective (no optax, no lax.scan, no library density), and each meta-step's
update, ``adapt`` and ``evaluate`` must match them.  Each test also checks that K - 1 steps would
have been told apart.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hiermeta as hm
from hiermeta.models import linear

K = 3
LR = 0.3  # inner SGD rate
BETA = 0.5  # outer SGD rate
SIGMA = 2.0
TOL = dict(rtol=1e-11, atol=1e-12)


@pytest.fixture(scope="module")
def tasks(paper):
    _, batch = linear.sample_tasks(paper, jax.random.PRNGKey(3), 3)
    return batch


def nll_grad(theta, data):
    """Gradient of -log p(D | theta) = 1/2 sum_n (x_n - A_n theta)^T Xi_n^-1 (x_n - A_n theta) + c, per task."""
    A, x, xi = data.inputs, data.obs, data.noise_sd  # (T, N, D, P), (T, N, D), (T, N, D)
    resid = (x - jnp.einsum("tndp,tp->tnd", A, theta)) / xi**2
    return -jnp.einsum("tndp,tnd->tp", A, resid)


def map_iterates(phi, sigma, data, steps):
    """theta_0 = phi, theta_{k+1} = theta_k - LR * grad L_t(theta_k), L_t = NLL + |theta - phi|^2 / (2 sigma^2)."""
    theta = jnp.broadcast_to(phi, (data.obs.shape[0], phi.shape[0]))
    out = [theta]
    for _ in range(steps):
        theta = theta - LR * (nll_grad(theta, data) + (theta - phi) / sigma**2)
        out.append(theta)
    return out


def mle_iterates(phi, data, steps, lr=LR):
    theta = jnp.broadcast_to(phi, (data.obs.shape[0], phi.shape[0]))
    out = [theta]
    for _ in range(steps):
        theta = theta - lr * nll_grad(theta, data)
        out.append(theta)
    return out


def query_loss(theta, data):
    """The generalisation loss: 1/2 sum ((x - A theta) / xi)^2 per query observation, per task."""
    z = (data.obs - jnp.einsum("tndp,tp->tnd", data.inputs, theta)) / data.noise_sd
    return 0.5 * jnp.sum(z**2, axis=(1, 2)) / data.obs.shape[1]


def far(a, b):
    return not np.allclose(a, b, rtol=1e-6, atol=1e-8)


def test_shrinkage_meta_step_takes_exactly_k_inner_steps(paper_model, tasks):
    """Algorithm 1 at K = 3: phi <- phi + beta mean_t (theta_K - phi) / sigma^2 and Eq. 4's
    log sigma^2 <- log sigma^2 + beta mean_t (theta_K - phi) * g_t, g_t = grad log p(D_t^val | theta_K)."""
    learner = hm.m_shrinkage(paper_model, inner_optimizer=optax.sgd(LR), inner_steps=K,
                             outer_optimizer=optax.sgd(BETA), init_sigma=SIGMA)
    phi = jnp.linspace(-1.0, 2.0, 8)
    state = learner.init(jax.random.PRNGKey(0), phi)
    new, _ = jax.jit(learner.step)(state, tasks)

    def expected(steps):
        theta = map_iterates(phi, SIGMA, tasks.train, steps)[-1]
        g = -nll_grad(theta, tasks.val)
        return (phi + BETA * jnp.mean(theta - phi, axis=0) / SIGMA**2,
                2 * np.log(SIGMA) + BETA * jnp.mean((theta - phi) * g, axis=0))

    phi_k, rho_k = expected(K)
    np.testing.assert_allclose(new.params["phi"], phi_k, **TOL)
    np.testing.assert_allclose(new.params["log_sigma2"], rho_k, **TOL)
    phi_short, rho_short = expected(K - 1)
    assert far(phi_short, phi_k) and far(rho_short, rho_k)
    # adapt runs the same K steps
    theta = learner.adapt(new, tasks.train, K).theta
    np.testing.assert_allclose(theta, map_iterates(phi_k, np.exp(0.5 * rho_k), tasks.train, K)[-1], **TOL)


def test_reptile_meta_step_takes_exactly_k_inner_steps(paper_model, tasks):
    """Reptile at K = 3: phi <- phi + beta mean_t (theta_K - phi), theta_K by K steps on the NLL."""
    learner = hm.reptile(paper_model, inner_optimizer=optax.sgd(LR), inner_steps=K, outer_optimizer=optax.sgd(BETA))
    phi = jnp.linspace(-1.0, 2.0, 8)
    new, _ = jax.jit(learner.step)(learner.init(jax.random.PRNGKey(0), phi), tasks)
    expected = lambda steps: phi + BETA * jnp.mean(mle_iterates(phi, tasks.train, steps)[-1] - phi, axis=0)
    np.testing.assert_allclose(new.params["phi"], expected(K), **TOL)
    assert far(expected(K - 1), expected(K))


def test_maml_meta_gradient_backpropagates_through_exactly_k_steps(paper_model, tasks):
    """MAML at K = 3: the meta-gradient of mean_t NLL(D_t^val | theta_K(phi, lr)) through the K
    hand-written steps (jax.grad of the Python loop), against the learner's outer SGD step."""
    lr = 0.05
    learner = hm.maml(paper_model, inner_steps=K, init_lr=lr, outer_optimizer=optax.sgd(BETA))
    phi = jnp.linspace(-1.0, 2.0, 8)
    new, _ = jax.jit(learner.step)(learner.init(jax.random.PRNGKey(0), phi), tasks)

    def meta_loss(params, steps):
        theta = mle_iterates(params["phi"], tasks.train, steps, lr=jnp.exp(params["log_lr"][0]))[-1]
        return jnp.mean(query_loss(theta, tasks.val)) * tasks.val.obs.shape[1]  # NLL up to a constant

    def expected(steps):
        params = {"phi": phi, "log_lr": jnp.log(jnp.array([lr]))}
        grads = jax.grad(meta_loss)(params, steps)
        return jax.tree_util.tree_map(lambda p, g: p - BETA * g, params, grads)

    want = expected(K)
    np.testing.assert_allclose(new.params["phi"], want["phi"], **TOL)
    np.testing.assert_allclose(new.params["log_lr"], want["log_lr"], **TOL)
    assert far(expected(K - 1)["phi"], want["phi"])


def test_evaluate_scores_iterates_zero_to_k(paper_model, tasks):
    """evaluate's column k is the query loss at the k-th explicit iterate, for k = 0..K."""
    learner = hm.m_shrinkage(paper_model, inner_optimizer=optax.sgd(LR), inner_steps=K, init_sigma=SIGMA)
    phi = jnp.linspace(-1.0, 2.0, 8)
    curve = hm.evaluate(learner, learner.init(jax.random.PRNGKey(0), phi), tasks, K)
    want = np.stack([query_loss(theta, tasks.val) for theta in map_iterates(phi, SIGMA, tasks.train, K)], axis=1)
    assert curve.per_task.shape == (3, K + 1)
    np.testing.assert_allclose(curve.per_task, want, **TOL)
    assert far(want[:, 1:], want[:, :-1])  # an off-by-one in the iterates would show
