"""The one NumPyro model (Eq. 1) serves log_density, handlers and prior sampling consistently."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.handlers import condition, seed, trace
from numpyro.infer.util import log_density


def test_joint_log_density_is_the_sum_of_per_task_terms(paper, paper_model, paper_tasks):
    theta, batch = paper_tasks
    phi, sigma = jnp.asarray(paper.phi) + 0.1, jnp.asarray(paper.sigma) * 1.3
    joint, _ = log_density(paper_model, (batch.train,), {}, {"phi": phi, "sigma": sigma, "theta": theta})
    per_task = jax.vmap(lambda th, d: paper_model.inner_objective(th, phi, sigma, d))(theta, batch.train)
    assert float(joint) == pytest.approx(-float(jnp.sum(per_task)), rel=1e-12)  # flat hyperpriors add 0


def test_prior_predictive_from_the_model(paper, paper_model, paper_tasks):
    _, batch = paper_tasks
    template = batch.train._replace(obs=None)
    model = condition(paper_model, {"phi": jnp.asarray(paper.phi), "sigma": jnp.asarray(paper.sigma)})
    tr = trace(seed(model, jax.random.PRNGKey(0))).get_trace(template)
    theta, obs = tr["theta"]["value"], tr["obs"]["value"]
    assert theta.shape == (25, 8) and obs.shape == (25, 4, 9)
    assert not tr["obs"]["is_observed"]
    # the sampled observations scatter around A theta with the known noise
    z = (np.asarray(obs) - np.asarray(theta @ paper.design.T)[:, None, :]) / paper.noise_sd
    assert abs(z.mean()) < 0.2 and abs(z.std() - 1) < 0.1

