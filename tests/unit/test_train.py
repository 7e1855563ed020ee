"""hiermeta/train.py: fit is the meta-step applied num_steps times on sample_tasks(fold_in(data_key,
step)), in compiled chunks of any size; sample_from draws distinct tasks of a fixed set."""

import jax
import numpy as np
import optax
import pytest

import hiermeta as hm
from hiermeta.learners.info import step_metrics


@pytest.fixture(scope="module")
def setup(paper, paper_model):
    from hiermeta.models import linear

    learner = hm.m_shrinkage(paper_model, inner_solver=hm.solvers.newton(), outer_optimizer=optax.adam(0.05))
    state = learner.init(jax.random.PRNGKey(0), np.asarray(paper.phi) + 0.5)
    sample = lambda key: linear.sample_tasks(paper, key, 6)[1]  # noqa: E731
    return learner, state, sample


def test_fit_is_the_meta_step_in_a_python_loop_whatever_the_chunk_size(setup):
    learner, state, sample = setup
    data_key, steps = jax.random.PRNGKey(7), 5
    step = jax.jit(learner.step)
    by_hand, metrics = state, []
    for _ in range(steps):
        by_hand, info = step(by_hand, sample(jax.random.fold_in(data_key, by_hand.step)))
        metrics.append(step_metrics(info))
    for chunk_size in (1, 2, 5):  # 5 chunks, 3 chunks with a short last one, 1 chunk
        got, history = hm.fit(learner, state, sample, steps, data_key=data_key, chunk_size=chunk_size,
                              progress=False)
        assert int(got.step) == steps and int(got.num_skipped) == 0
        np.testing.assert_allclose(got.params["phi"], by_hand.params["phi"], rtol=1e-12)
        np.testing.assert_allclose(got.params["log_sigma2"], by_hand.params["log_sigma2"], rtol=1e-12)
        assert sorted(history) == sorted(metrics[0])
        for name in history:
            np.testing.assert_allclose(history[name], np.stack([m[name] for m in metrics]), rtol=1e-10, atol=1e-10,
                                       err_msg=f"{name}, chunk_size={chunk_size}")


def test_fit_of_zero_steps_returns_the_state(setup):
    learner, state, sample = setup
    got, history = hm.fit(learner, state, sample, 0, data_key=jax.random.PRNGKey(0), progress=False)
    assert int(got.step) == 0
    np.testing.assert_array_equal(got.params["phi"], state.params["phi"])
    assert all(np.shape(v)[0] == 0 for v in history.values())


def test_sample_from_draws_distinct_tasks_of_the_set(paper_tasks):
    _, tasks = paper_tasks  # 25 tasks
    draw = jax.jit(hm.sample_from(tasks, 10))
    ids = np.asarray(tasks.train.obs[:, 0, 0])  # the first observation identifies a task
    for k in range(20):
        batch = draw(jax.random.PRNGKey(k))
        picked = np.asarray(batch.train.obs[:, 0, 0])
        index = [int(np.flatnonzero(ids == v)[0]) for v in picked]
        assert len(set(index)) == 10  # without replacement
        np.testing.assert_array_equal(batch.val.obs, tasks.val.obs[np.array(index)])  # support and query together
    np.testing.assert_array_equal(draw(jax.random.PRNGKey(3)).train.obs, draw(jax.random.PRNGKey(3)).train.obs)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        hm.sample_from(tasks, 0)
    with pytest.raises(ValueError, match="batch_size must be between 1 and the 25 tasks available, got 26"):
        hm.sample_from(tasks, 26)
