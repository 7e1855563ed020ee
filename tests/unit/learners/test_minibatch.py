"""hiermeta/learners/minibatch.py: K steps on random minibatches of a task's support."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hiermeta as hm
from hiermeta.learners.minibatch import minibatch_steps, task_rows
from hiermeta.models import linear

SIGMA = jnp.full(8, 2.0)


def weighted(paper_model, phi):
    def loss(theta, rows, weight):
        log_prior, log_lik = paper_model.task_log_densities(theta, phi, SIGMA, rows)
        return -(log_prior + weight * log_lik)
    return loss


def first_task(tasks):
    return jax.tree_util.tree_map(lambda a: a[0], tasks.train)


def test_a_batch_as_large_as_the_support_is_plain_gradient_steps(paper, paper_model, paper_tasks):
    data = first_task(paper_tasks[1])  # 4 support rows
    phi = jnp.asarray(paper.phi)
    loss = weighted(paper_model, phi)
    steps = minibatch_steps(optax.sgd(0.05), 10, batch_size=6)
    got = jax.jit(lambda k: steps.solve(loss, phi, data, k, SIGMA**2))(jax.random.PRNGKey(3))
    want = hm.solvers.gradient_steps(optax.sgd(0.05), 10).solve(lambda th: loss(th, data, 1.0), phi)
    np.testing.assert_allclose(got.theta, want.theta, rtol=1e-12)
    np.testing.assert_allclose(got.final_loss, want.final_loss, rtol=1e-12)
    assert float(got.stationarity) == pytest.approx(float(want.stationarity), rel=1e-10)
    assert bool(got.converged) and not bool(got.diverged)  # tol inf: never judged unconverged (K steps are the algorithm)


def test_minibatch_steps_are_unbiased_for_the_full_step(paper, paper_model, paper_tasks):
    """One step on 2 of 4 rows, weighted 4/2: its mean over 4000 draws is the full-batch step (4 s.e.)."""
    data = first_task(paper_tasks[1])
    phi = jnp.asarray(paper.phi) + 0.3
    loss = weighted(paper_model, phi)
    steps = minibatch_steps(optax.sgd(0.01), 1, batch_size=2)
    draws = jax.jit(jax.vmap(lambda k: steps.solve(loss, phi, data, k, SIGMA**2).theta))(
        jax.random.split(jax.random.PRNGKey(0), 4000))
    full = phi - 0.01 * jax.grad(loss)(phi, data, 1.0)
    se = np.std(np.asarray(draws), axis=0, ddof=1) / np.sqrt(4000)
    assert np.all(np.abs(np.mean(draws, axis=0) - full) < 4 * se + 1e-14)
    assert np.all(se > 0)  # the draws differ: it did subsample


def test_padding_is_never_drawn(paper, paper_model, paper_tasks):
    data = first_task(paper_tasks[1])
    padded = data._replace(mask=data.mask.at[2:].set(False), obs=data.obs.at[2:].set(jnp.nan))
    phi = jnp.asarray(paper.phi)
    loss = weighted(paper_model, phi)
    got = minibatch_steps(optax.sgd(0.05), 20, batch_size=2).solve(loss, phi, padded, jax.random.PRNGKey(1), SIGMA**2)
    valid = task_rows(data, jnp.arange(2))
    want = hm.solvers.gradient_steps(optax.sgd(0.05), 20).solve(lambda th: loss(th, valid, 1.0), phi)
    np.testing.assert_allclose(got.theta, want.theta, rtol=1e-12)


def test_a_minibatched_learner_draws_from_its_key_and_adapts_to_other_shots(paper, paper_model, paper_tasks):
    """Training shots and test shots may differ; the same state draws the same minibatches."""
    _, batch = paper_tasks
    learner = hm.learners.sigma_reptile(paper_model, inner_optimizer=hm.learners.proximal_sgd(0.05), inner_steps=20,
                               batch_size=2)
    state = learner.init(jax.random.PRNGKey(0), jnp.asarray(paper.phi), sigma=2.0)
    step = jax.jit(learner.step)
    a, _ = step(state, batch)
    b, _ = step(state, batch)
    np.testing.assert_array_equal(a.params["phi"], b.params["phi"])
    c, _ = step(state._replace(step=state.step + 1), batch)  # another step count: other minibatches
    assert not np.allclose(c.params["phi"], a.params["phi"])
    one_shot = linear.sample_tasks(linear.paper_domain(n_train=1), jax.random.PRNGKey(5), 3)[1]
    adapted = jax.jit(learner.adapt)(a, one_shot.train)
    assert adapted.theta.shape == (3, 8) and np.all(np.isfinite(adapted.theta))


def test_bad_minibatch_configuration(paper_model):
    with pytest.raises(ValueError, match="batch_size"):
        minibatch_steps(optax.sgd(0.1), 10, batch_size=0)
    with pytest.raises(ValueError, match="fixed rate"):
        minibatch_steps(hm.learners.proximal_sgd(), 10, batch_size=2)
    with pytest.raises(ValueError, match="optimizer"):
        minibatch_steps("sgd", 10, batch_size=2)
    with pytest.raises(ValueError, match="own K"):
        hm.learners.gaussian_prior_learner(paper_model, inner_optimizer=minibatch_steps(optax.sgd(0.1), 5, 2),
                                           inner_steps=5)
