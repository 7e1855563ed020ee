"""Appendix B of Chen et al.: the 1-D toy, PLL against joint MAP, with many tasks.

theta_t ~ N(phi, s^2), x_{t,n} ~ N(theta_t, 1), N support and K query points per task.  With
S = mean_t (xbar_t - xbar)^2, the joint-MAP sigma^2 gradient vanishes at
(S - 2/N +- sqrt(S (S - 4/N))) / 2 and is negative everywhere when S < 4/N (collapse to 0); as
T -> inf its upper root tends to (s^2 - 1/N + sqrt((s^2 + 1/N)(s^2 - 3/N))) / 2 < s^2 (Eq. 10).
The PLL gradient's root is s^2 itself, and the exact gradient is Eq. 4's times 1/(1 + N sigma^2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import brentq

from hiermeta.implicit import eq4_solve, implicit_vjp
from hiermeta.models import linear

N = K = 5
T = 200_000
PHI = 0.7


def toy(s2, seed):
    domain = linear.LinearDomain(phi=np.array([PHI]), sigma=np.array([np.sqrt(s2)]), design=np.ones((1, 1)),
                                 noise_sd=np.ones(1), n_train=N, n_val=K)
    _, batch = linear.sample_tasks(domain, jax.random.PRNGKey(seed), T)
    return batch


MODEL = linear.make_model(1)


@jax.jit
def gradients(log_s2, phi, batch):
    """Mean over tasks of: Eq. 4 PLL gradient, exact PLL gradient, joint-MAP gradient (all in rho)."""
    phi, sigma = phi[None], jnp.exp(0.5 * log_s2)[None]
    theta_hat, _ = linear.posterior(batch.train, phi, sigma)  # the inner MAP, exact

    def per_task(theta, train_t, val_t):
        params = {"phi": phi, "log_sigma2": log_s2[None]}

        def inner_grad(th, p):
            return jax.grad(MODEL.inner_objective)(th, p["phi"], jnp.exp(0.5 * p["log_sigma2"]), train_t)

        g = jax.grad(MODEL.log_likelihood)(theta, val_t)
        eq4 = implicit_vjp(inner_grad, theta, params, eq4_solve(None, sigma**2, g))["log_sigma2"][0]
        # joint MAP: d/drho of the log joint at the inner optimum (envelope theorem)
        joint = -jax.grad(lambda r: MODEL.inner_objective(theta, phi, jnp.exp(0.5 * r)[None], train_t))(log_s2)
        return eq4, joint

    eq4, joint = jax.vmap(per_task)(theta_hat, batch.train, batch.val)

    def pll(r):
        th, _ = linear.posterior(batch.train, phi, jnp.exp(0.5 * r)[None])
        return jnp.mean(jax.vmap(MODEL.log_likelihood)(th, batch.val))

    return jnp.mean(eq4), jax.grad(pll)(log_s2), jnp.mean(joint)


def root_in_sigma2(which, phi, batch, lo=0.05, hi=20.0):
    f = lambda r: float(gradients(jnp.asarray(r), jnp.asarray(phi), batch)[which])
    return float(np.exp(brentq(f, np.log(lo), np.log(hi), xtol=1e-10)))


def summary(batch):
    xbar = np.asarray(batch.train.obs[:, :, 0].mean(axis=1))
    phi = xbar.mean()  # the joint MAP of phi (flat prior, equal N), whatever sigma
    return phi, np.mean((xbar - phi) ** 2)


def test_pll_root_is_the_truth_and_joint_map_root_is_biased():
    s2 = 2.25
    batch = toy(s2, seed=0)
    phi, S = summary(batch)
    # exact and Eq. 4 gradients differ by the positive factor 1 / (1 + N sigma^2)
    for sigma2 in (0.5, 3.0):
        eq4, exact, _ = gradients(jnp.log(sigma2), jnp.asarray(phi), batch)
        assert float(exact) == pytest.approx(float(eq4) / (1 + N * sigma2), rel=1e-9)
    pll_eq4, pll_exact = root_in_sigma2(0, phi, batch), root_in_sigma2(1, phi, batch)
    assert pll_eq4 == pytest.approx(pll_exact, rel=1e-8)
    assert pll_exact == pytest.approx(s2, abs=0.05)  # sampling spread over seeds ~0.01

    assert S > 4 / N
    upper = (S - 2 / N + np.sqrt(S * (S - 4 / N))) / 2
    joint = root_in_sigma2(2, phi, batch, lo=0.8 * upper)
    assert joint == pytest.approx(upper, rel=1e-8)
    eq10 = (s2 - 1 / N + np.sqrt((s2 + 1 / N) * (s2 - 3 / N))) / 2  # 2.0303
    assert joint == pytest.approx(eq10, abs=0.02)
    assert joint < s2 - 0.15  # biased low, well beyond the sampling spread


def test_joint_map_collapses_when_sigma_is_small_but_pll_does_not():
    s2 = 0.4  # < 3/N = 0.6
    batch = toy(s2, seed=1)
    phi, S = summary(batch)
    assert S < 4 / N
    for sigma2 in np.geomspace(1e-3, 10.0, 12):
        assert float(gradients(jnp.log(sigma2), jnp.asarray(phi), batch)[2]) < 0  # always towards 0
    assert root_in_sigma2(1, phi, batch) == pytest.approx(s2, abs=0.02)
