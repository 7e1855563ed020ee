"""Bad input raises a ValueError naming the problem, before anything is compiled."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hiermeta as hm
from hiermeta.tasks import check_task_batch
from models import linear

OBS = np.zeros((3, 2, 9))
DESIGN = linear.paper_domain().design
NOISE = linear.paper_domain().noise_sd


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(obs=np.zeros((3, 9))), "shape \\(tasks, observations, dims\\)"),
        (dict(obs=np.where(np.arange(54).reshape(3, 2, 9) == 7, np.nan, 0.0)), "NaN or infinite"),
        (dict(obs=np.full((3, 2, 9), np.inf)), "NaN or infinite"),
        (dict(noise_sd=np.where(np.arange(9) == 2, 0.0, 1.0)), "noise_sd must be finite and > 0"),
        (dict(noise_sd=-NOISE), "noise_sd must be finite and > 0"),
        (dict(noise_sd=np.ones(4)), "does not broadcast"),
        (dict(obs=np.zeros((0, 2, 9))), "empty"),
        (dict(obs=np.zeros((3, 0, 9))), "empty"),
        (dict(mask=np.array([[1, 1], [0, 0], [1, 0]], bool)), "task\\(s\\) \\[1\\] hold no observations"),
        (dict(mask=np.ones((3, 3), bool)), "mask must have shape"),
        (dict(design=np.ones((8, 8))), "design must end in \\(D, P\\)"),
        (dict(design=np.full((9, 8), np.nan)), "design holds NaN"),
        (dict(design=np.ones((4, 2, 9, 8))), "does not broadcast"),
    ],
)
def test_malformed_data(kwargs, match):
    args = dict(obs=OBS, design=DESIGN, noise_sd=NOISE) | kwargs
    with pytest.raises(ValueError, match=match):
        linear.make_data(**args)


def test_nan_in_padding_is_fine_and_zeroed():
    obs = OBS.copy()
    obs[1, 1] = np.nan
    data = linear.make_data(obs, DESIGN, NOISE, mask=np.array([[1, 1], [1, 0], [1, 1]], bool))
    assert np.all(np.isfinite(np.asarray(data.obs)))


def test_splits_must_hold_the_same_tasks(paper_tasks):
    _, batch = paper_tasks
    short = batch._replace(val=jax.tree_util.tree_map(lambda a: a[:5], batch.val))
    with pytest.raises(ValueError, match="25 tasks but val split has 5"):
        check_task_batch(linear.likelihood, short)
    with pytest.raises(ValueError, match="TaskBatch"):
        check_task_batch(linear.likelihood, (batch.train, batch.val))


@pytest.fixture(scope="module")
def learner(paper_model):
    return hm.m_shrinkage(paper_model, inner_optimizer=optax.sgd(0.3), inner_steps=10)


def test_evaluate_and_fit_check_their_data_first(learner, paper, paper_tasks):
    _, batch = paper_tasks
    state = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
    bad = batch._replace(train=batch.train._replace(obs=batch.train.obs.at[0, 0, 0].set(jnp.inf)))
    with pytest.raises(ValueError, match="train split: obs holds 1 NaN or infinite"):
        hm.evaluate(learner, state, bad, 10)
    with pytest.raises(ValueError, match="val split: noise_sd"):
        hm.fit(learner, state, lambda key: batch._replace(val=batch.val._replace(noise_sd=0 * batch.val.noise_sd)),
               5, data_key=jax.random.PRNGKey(0), progress=False)
    with pytest.raises(ValueError, match="num_steps must be >= 0"):
        hm.evaluate(learner, state, batch, -1)
    nan_state = state._replace(params={**state.params, "phi": state.params["phi"].at[0].set(jnp.nan)})
    with pytest.raises(ValueError, match="initial meta-parameters hold NaN"):
        hm.fit(learner, nan_state, lambda key: batch, 5, data_key=jax.random.PRNGKey(0), progress=False)


@pytest.mark.parametrize("sigma, match", [(0.0, "> 0"), (-1.0, "> 0"), (np.nan, "> 0"), (np.ones(3), "shape \\(8,\\)")])
def test_non_positive_or_misshaped_sigma(learner, sigma, match):
    with pytest.raises(ValueError, match=match):
        learner.init(jax.random.PRNGKey(0), jnp.zeros(8), sigma=sigma)


def test_bad_learner_configuration(paper_model):
    with pytest.raises(ValueError, match="init_sigma"):
        hm.shrinkage(paper_model, inner_optimizer=optax.sgd(0.1), inner_steps=5, init_sigma=0.0)
    with pytest.raises(ValueError, match="inner_steps"):
        hm.shrinkage(paper_model, inner_optimizer=optax.sgd(0.1), inner_steps=-1)
    learner = hm.shrinkage(paper_model, inner_optimizer=optax.sgd(0.1), inner_steps=5)
    with pytest.raises(ValueError, match="shape \\(9,\\), expected \\(8,\\)"):
        learner.init(jax.random.PRNGKey(0), jnp.zeros(9))


def test_bad_model_construction(paper_model):
    with pytest.raises(ValueError, match="TaskLikelihood"):
        hm.HierarchicalModel(lambda theta, data: None, paper_model.partition)
    with pytest.raises(ValueError, match="ModulePartition"):
        hm.HierarchicalModel(linear.likelihood, {"w": 0})
    import numpyro.distributions as dist

    with pytest.raises(ValueError, match="sigma_prior"):
        hm.HierarchicalModel(linear.likelihood, paper_model.partition, sigma_prior=dist.HalfNormal(jnp.ones(3)))
