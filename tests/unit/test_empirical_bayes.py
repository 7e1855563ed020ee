"""hiermeta.empirical_bayes: type-II ML against a closed form, the statistics and their groups against
the per-observation objective, and its convergence and boundary reports."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hiermeta as hm
from hiermeta import empirical_bayes as eb

T, N, S = 30, 4, 1.5  # groups, observations per group, known noise sd


def intercepts(seed=0, spread=2.0):
    """A balanced random intercept: y_tn = theta_t + e, theta_t ~ N(1, spread^2), e ~ N(0, S^2)."""
    rng = np.random.default_rng(seed)
    y = 1.0 + spread * rng.normal(size=(T, 1)) + S * rng.normal(size=(T, N))
    model = hm.HierarchicalModel(hm.linear_gaussian(), hm.ModulePartition.per_coordinate(jnp.zeros(1)))
    return model, hm.GaussianData.from_design(y[..., None], np.ones((1, 1)), S), y


def test_balanced_random_intercept_has_the_closed_form_estimate():
    """The group means are iid N(phi, sigma^2 + S^2/N): phi_hat = their mean, sigma_hat^2 = their
    (1/T) variance less S^2/N, and the log marginal is that of the means plus the within-group part."""
    model, data, y = intercepts()
    fit = hm.type2_ml(model, data, tol=1e-9)
    ybar = y.mean(1)
    assert fit.phi[0] == pytest.approx(ybar.mean(), abs=1e-7)
    assert fit.sigma[0] ** 2 == pytest.approx(np.mean((ybar - ybar.mean()) ** 2) - S**2 / N, rel=1e-6)
    within = -0.5 * np.sum((y - ybar[:, None]) ** 2) / S**2 - T * (N - 1) * np.log(S) \
        - 0.5 * T * (N - 1) * np.log(2 * np.pi) - 0.5 * T * np.log(N)
    v = fit.sigma[0] ** 2 + S**2 / N
    between = -0.5 * np.sum((ybar - fit.phi[0]) ** 2) / v - 0.5 * T * np.log(2 * np.pi * v)
    assert fit.log_marginal == pytest.approx(within + between, rel=1e-10)
    assert fit.converged and not fit.singular


def test_converged_is_the_gradient_against_tol_itself():
    """Stopped by the iteration budget with its largest gradient component between tol and 10 tol,
    the fit is not converged and says so."""
    model, data, _ = intercepts(1)
    full = hm.type2_ml(model, data, tol=1e-10, max_iter=3, warn=False)
    g = full.grad_norm
    assert g > 1e-10
    again = hm.type2_ml(model, data, tol=g / 2, max_iter=3, warn=False)  # the same three iterations
    assert again.grad_norm == pytest.approx(g, rel=1e-6) and not again.converged
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hm.type2_ml(model, data, tol=g / 2, max_iter=3)
    assert any("did not converge" in str(w.message) for w in caught)
    assert hm.type2_ml(model, data, tol=g * 1.0001, max_iter=3, warn=False).converged


def test_a_sigma_at_zero_is_reported_on_the_boundary():
    """With no spread between groups beyond the noise the ML sigma is 0: a singular fit."""
    model, data, y = intercepts(2, spread=0.0)
    ybar = y.mean(1)
    assert np.mean((ybar - ybar.mean()) ** 2) < S**2 / N  # the closed form: sigma_hat^2 = max(0, ...) = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = hm.type2_ml(model, data)
    assert fit.singular == (f"sigma[{model.partition.names[0]}]",) and fit.sigma[0] < 1e-2
    assert any("boundary" in str(w.message) for w in caught)


def test_grouped_and_per_task_statistics_give_the_per_observation_objective():
    model, data, _ = intercepts(3)
    objective = eb._compiled_objective(model, "ML", "exact", 1, True)
    u, psi = objective.pack({"phi": np.array([0.7]), "sigma": np.array([1.3])})
    num = jnp.asarray(float(T))
    grouped = eb.task_statistics(model, data)
    per_task = eb.task_statistics(model, data, group=False)
    assert grouped.stats.moments.shape[:2] == (1, 1) and grouped.num_tasks == T  # one design: one group
    assert per_task.num_tasks == T
    plain = eb._compiled_objective(model, "ML", "exact", 1, False)
    want = plain.value_and_grad(u, data, psi, num)
    for inputs in (grouped, per_task):
        got = objective.value_and_grad(u, inputs._replace(moments=None), psi, num)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-10)


def test_init_is_checked_before_anything_is_computed():
    model, data, _ = intercepts()
    with pytest.raises(ValueError, match="init names unknown sites"):
        hm.type2_ml(model, data, init={"tau": 1.0})
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        hm.type2_ml(model, data, init={"sigma": [-1.0]})
