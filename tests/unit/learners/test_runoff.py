"""hiermeta/learners/runoff.py: run-off judged from sigma's own trajectory, and warned by fit."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hiermeta as hm
from hiermeta.learners.runoff import check_run_off
from hiermeta.models import linear


def history(growth, residual=None):
    out = {"sigma_growth": np.asarray(growth, float)}
    if residual is not None:
        out["sigma_residual"] = np.full(len(growth), residual)
    return out


def test_a_steady_drift_is_flagged_and_a_settled_sigma_is_not():
    rng = np.random.default_rng(0)
    settled = rng.normal(0.0, 0.05, size=(200, 2))  # wanders both ways
    drift = settled.copy()
    drift[:, 1] = 0.03 + rng.normal(0.0, 0.01, 200)  # +0.03 per step in log sigma: x3.3 over the last 40
    with pytest.warns(hm.errors.SigmaRunOffWarning, match=r"head: sigma rose by a factor 3\.\d+ \(100% .*residual of 2e\+04 over those steps"):
        check = check_run_off(history(drift, 2e4), names=["block0", "head"], who="M-Shrinkage")
    assert check.window == 40 and check.ran_off.tolist() == [False, True]
    np.testing.assert_allclose(check.growth[1], np.exp(drift[-40:, 1].sum()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not check_run_off(history(settled)).ran_off.any()
        assert check_run_off(history(drift[:10])).window == 0  # too short to judge
    with pytest.warns(hm.errors.SigmaRunOffWarning, match="module 0: sigma fell"):
        assert check_run_off(history(-np.abs(drift[:, 1:]))).ran_off.all()


@pytest.mark.parametrize("start, runs_off", [(0.05, True), (None, False)])
def test_fit_warns_when_sigma_runs_off(start, runs_off, paper, paper_model):
    """From sigma = 0.05 the Eq. 4 step raises every sigma at Adam's rate for 40 steps (a drift);
    from Eq. 4's own fixed point (5.39, closed form) sigma wanders and fit stays quiet."""
    fixed_point = 5.39
    learner = hm.shrinkage(paper_model, outer_optimizer=optax.adam(0.1))
    state = learner.init(jax.random.PRNGKey(0), jnp.asarray(paper.phi), sigma=start or fixed_point)
    sample = lambda key: linear.sample_tasks(paper, key, 25)[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, hist = hm.fit(learner, state, sample, 40, data_key=jax.random.PRNGKey(1), progress=False)
    ran_off = [w for w in caught if issubclass(w.category, hm.errors.SigmaRunOffWarning)]
    assert bool(ran_off) == runs_off, [str(w.message) for w in ran_off]
    assert hist["sigma_growth"].shape == (40, 8) and hist["sigma_residual"].shape == (40,)
    if runs_off:
        assert "Shrinkage: the learned sigma is running off (or has not settled) over the last 20 meta-steps: " \
               "every module (one shared sigma): sigma rose" in str(ran_off[0].message)
