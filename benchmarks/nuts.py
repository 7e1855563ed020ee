"""NUTS effective samples per second on eight schools and on the linear hierarchy.

``numpyro.infer.NUTS`` runs on ``hiermeta.HierarchicalModel`` itself (Eq. 1 with proper priors)
and, in the same run, on the same model written by hand in NumPyro: the ratio is the cost of
hiermeta's generality.  float64.  Per run: one chain, warm-up then samples; ESS is NumPyro's
``effective_sample_size`` per coordinate; "min ESS/s" divides the smallest ESS over every latent
coordinate by the wall time of the whole run (warm-up included) after compilation (the first
run of each model compiles and is timed apart).  "grad us": microseconds per gradient of the
potential energy (the cost of one leapfrog step), timed round-robin: the clean overhead figure,
since ESS also depends on each chain's luck.  Medians over ``--repeats`` runs with
different seeds, alternating the two implementations.

    eight schools   theta_j ~ N(mu, tau^2), y_j ~ N(theta_j, s_j^2); mu ~ N(0, 5^2),
                    tau ~ HalfCauchy(5) (the centred parameterisation: divergences are expected)
    linear          the paper's linear domain (P = 8, 4 + 4 observations) with T = 20 tasks;
                    phi ~ N(0, 10^2 I), sigma_m ~ HalfCauchy(10)

    python benchmarks/nuts.py            # 1000 warm-up + 1000 samples, 5 repeats
    python benchmarks/nuts.py --quick    # 300 + 300, 2 repeats
"""

from __future__ import annotations

import statistics
import time

from common import Timer, format_table, parser, ratio, round_robin, settle, write_results  # noqa: I001

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.diagnostics import effective_sample_size  # noqa: E402
from numpyro.infer import MCMC, NUTS  # noqa: E402
from numpyro.infer.util import initialize_model  # noqa: E402

import hiermeta as hm  # noqa: E402
from hiermeta.models import linear  # noqa: E402

HEADERS = ["problem", "model", "min ESS/s", "min ESS", "run s", "leapfrog/s", "grad us", "first run s",
           "divergences"]
Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
S = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools_hiermeta():
    likelihood = hm.GaussianLikelihood(lambda theta, inputs: theta)  # (1,): one observation per school
    partition = hm.ModulePartition.shared(jnp.zeros(1))
    model = hm.HierarchicalModel(likelihood, partition, phi_prior=dist.Normal(jnp.zeros(1), 5.0),
                                 sigma_prior=dist.HalfCauchy(jnp.full(1, 5.0)))
    data = hm.GaussianData.create(Y[:, None, None], S[:, None, None])
    return model, (data,)


def eight_schools_numpyro(y=jnp.asarray(Y), s=jnp.asarray(S)):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("schools", 8):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("obs", dist.Normal(theta, s), obs=y)


def linear_data(T=20):
    paper = linear.paper_domain()
    _, batch = linear.sample_tasks(paper, jax.random.PRNGKey(0), T)
    return paper, linear.merge_splits(batch)


def linear_hiermeta():
    _, data = linear_data()
    model = linear.make_model(8, phi_prior=dist.Normal(jnp.zeros(8), 10.0),
                              sigma_prior=dist.HalfCauchy(jnp.full(8, 10.0)))
    return model, (data,)


def linear_numpyro_model(obs, design, noise):
    T = obs.shape[0]
    phi = numpyro.sample("phi", dist.Normal(jnp.zeros(8), 10.0).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(jnp.full(8, 10.0)).to_event(1))
    with numpyro.plate("tasks", T):
        theta = numpyro.sample("theta", dist.Normal(phi, sigma).to_event(1))
        mean = jnp.einsum("tndp,tp->tnd", design, theta)
        numpyro.sample("obs", dist.Normal(mean, noise).to_event(2), obs=obs)


def linear_numpyro():
    paper, data = linear_data()
    # the same per-observation design array hiermeta's linear domain uses, so the two differ only
    # in how the model is written
    return linear_numpyro_model, (data.obs, data.inputs, jnp.asarray(paper.noise_sd))


def min_ess(samples: dict) -> tuple[float, float]:
    ess = []
    for value in samples.values():
        flat = np.asarray(value).reshape(value.shape[0], -1)
        ess.append(np.asarray(effective_sample_size(flat[None])))
    ess = np.concatenate(ess)
    return float(ess.min()), float(np.median(ess))


def run(mcmc, args_, key):
    t0 = time.perf_counter()
    mcmc.run(key, *args_, extra_fields=("diverging", "num_steps"))
    jax.block_until_ready(mcmc.get_samples())
    seconds = time.perf_counter() - t0
    extra = mcmc.get_extra_fields()
    return mcmc, seconds, (int(np.sum(extra["diverging"])), int(np.sum(extra["num_steps"])))


def gradient_timer(name, model, model_args):
    """Microseconds per gradient of the potential energy (what each leapfrog step costs)."""
    info = initialize_model(jax.random.PRNGKey(0), model, model_args=model_args)
    grad = jax.jit(jax.grad(info.potential_fn))
    z = info.param_info.z
    jax.block_until_ready(grad(z))

    def run(n):
        out = None
        for _ in range(n):
            out = grad(z)
        jax.block_until_ready(out)

    return Timer(name, run)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--warmup", type=int)
    p.add_argument("--samples", type=int)
    args = p.parse_args(argv)
    timing = settle(p.parse_args(argv))
    warmup = args.warmup or (300 if args.quick else 1000)
    samples = args.samples or (300 if args.quick else 1000)
    repeats = args.repeats or (2 if args.quick else 5)
    problems = {"eight schools": (eight_schools_hiermeta, eight_schools_numpyro_builder),
                "linear (T=20)": (linear_hiermeta, linear_numpyro)}
    rows, results = [], {}
    for problem, builders in problems.items():
        chains = {}
        timers = [gradient_timer(impl, *builder()) for impl, builder in
                  zip(("hiermeta.HierarchicalModel", "hand-written NumPyro"), builders)]
        round_robin(timers, timing.repeats, timing.min_block, verbose=False)
        grad_ratio = ratio(timers[0], timers[1])
        for impl, builder in zip(("hiermeta.HierarchicalModel", "hand-written NumPyro"), builders):
            model, model_args = builder()
            # one MCMC object per model, jit_model_args: later runs reuse the compiled sampler
            mcmc = MCMC(NUTS(model), num_warmup=warmup, num_samples=samples, progress_bar=False,
                        jit_model_args=True)
            chains[impl] = (mcmc, model_args)
            _, first, _ = run(mcmc, model_args, jax.random.PRNGKey(100))
            t = timers[0] if impl.startswith("hiermeta") else timers[1]
            results.setdefault(problem, {})[impl] = {"first_run_seconds": first, "runs": [],
                                                     "gradient_us": t.median * 1e6,
                                                     "gradient_blocks_us": [b * 1e6 for b in t.blocks]}
        results[problem]["gradient_ratio_hiermeta_to_hand_written"] = grad_ratio
        for r in range(repeats):
            for impl, (mcmc, model_args) in chains.items():
                mcmc, seconds, (div, leapfrogs) = run(mcmc, model_args, jax.random.PRNGKey(r))
                lo, med = min_ess(mcmc.get_samples())
                results[problem][impl]["runs"].append({"seconds": seconds, "min_ess": lo, "median_ess": med,
                                                        "divergences": div, "sampling_leapfrog_steps": leapfrogs})
        for impl in chains:
            entry = results[problem][impl]
            runs = entry["runs"]
            sec = statistics.median(r["seconds"] for r in runs)
            ess_s = statistics.median(r["min_ess"] / r["seconds"] for r in runs)
            # leapfrog steps of the sampling phase per second of the whole run: a throughput
            # figure free of the sampler's luck (warm-up steps are not recorded by NumPyro)
            lf_s = statistics.median(r["sampling_leapfrog_steps"] / r["seconds"] for r in runs)
            entry.update(median_seconds=sec, min_ess_per_second=ess_s,
                         median_min_ess=statistics.median(r["min_ess"] for r in runs),
                         divergences=[r["divergences"] for r in runs], sampling_leapfrog_steps_per_second=lf_s)
            rows.append([problem, impl, ess_s, entry["median_min_ess"], sec, lf_s, entry["gradient_us"],
                         entry["first_run_seconds"], statistics.median(r["divergences"] for r in runs)])
        print(format_table(HEADERS, rows[-2:], 2), flush=True)
    print(f"\nNUTS, one chain, {warmup} warm-up + {samples} samples, median of {repeats} runs (float64)")
    print(format_table(HEADERS, rows, 2))
    for problem in problems:
        print(f"gradient of the potential, hiermeta / hand-written ({problem}): "
              f"{results[problem]['gradient_ratio_hiermeta_to_hand_written']:.2f} (median over rounds)")
    write_results(args, "nuts", {"results": results, "warmup": warmup, "samples": samples, "repeats": repeats})


def eight_schools_numpyro_builder():
    return eight_schools_numpyro, ()


if __name__ == "__main__":
    main()
