"""Type-II ML of a linear mixed model from 100 to 10^6 groups, beside statsmodels MixedLM.

The model (float64): groups t = 1..G, 10 observations each at x = 0..9 (sleepstudy's design),

    y_{t,n} = theta_{t,0} + theta_{t,1} x_n + e_{t,n},   e ~ N(0, s^2)  (s learned),
    theta_t ~ N(phi, Sigma),  Sigma with sds sigma = (25, 6) and correlation 0.2  (correlated, learned)

simulated once per size with a fixed seed (phi = (250, 10), s = 25).  ``hm.type2_ml(method="ML")``
and ``statsmodels.MixedLM("y ~ x", groups, re_formula="~x").fit(reml=False)`` fit the same data;
the table gives each one's wall time per fit (median of ``--repeats`` fits in one process; for
hiermeta the first fit, which compiles or reads the persistent compilation cache, is timed apart), their ratio, the largest absolute difference of the
estimates (phi, sigma, the correlation, s) and of the maximised log-likelihood, and the peak
resident memory of the process (``resource.getrusage``) after the fits, above the memory it held
once the data was built.  statsmodels runs up to ``--statsmodels-max`` groups; hiermeta alone
beyond.  Every (size, tool) runs in its own process so that the peak memory is its own.

    python benchmarks/type2_scale.py            # 100 .. 10^6 groups, statsmodels to 10^4
    python benchmarks/type2_scale.py --quick    # 100 .. 10^5 groups, statsmodels to 10^3

``--domain paper``: the paper's linear domain instead (``models.linear.paper_domain``: 8
coefficients, one module each, known noise; every task's 4 + 4 observations of 9 scalars merged),
10^4 .. 10^6 tasks drawn with NumPy (the shared design and noise as broadcast views, so the data
of 10^6 tasks takes 0.6 GB).  ``--baseline DIR`` also fits every size up to ``--baseline-max``
with the hiermeta found in ``DIR`` (e.g. ``git archive 88d516e hiermeta models | tar -x -C DIR``),
in its own processes on the same data, and reports its time and the difference of the maximised
log marginals (absolute, and per task).

    python benchmarks/type2_scale.py --domain paper --repeats 5 --baseline /tmp/old_hiermeta
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHI, SIGMA, CORR, NOISE, N_OBS = (250.0, 10.0), (25.0, 6.0), 0.2, 25.0, 10


def simulate(groups: int, seed: int = 0):
    """``(y (G, N), x (N,))`` from the model in the docstring."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = np.arange(N_OBS, dtype=float)
    cov = np.array([[SIGMA[0] ** 2, CORR * SIGMA[0] * SIGMA[1]], [CORR * SIGMA[0] * SIGMA[1], SIGMA[1] ** 2]])
    theta = np.asarray(PHI) + rng.standard_normal((groups, 2)) @ np.linalg.cholesky(cov).T
    y = theta[:, :1] + theta[:, 1:] * x + NOISE * rng.standard_normal((groups, N_OBS))
    return y, x


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def paper_data(groups: int, seed: int = 0):
    """``groups`` tasks of the paper's linear domain (``models.linear.paper_domain``: design
    ``[I_8; 1^T / sqrt 8]``, noise sd ``[8]*4 + [5]*4 + [1]``, phi 1, sigma ``[8]*4 + [2]*4``; every
    task's 4 + 4 observations merged) and its model (one module per coordinate, known noise), as a
    ``GaussianData`` whose shared design and noise are broadcast views (no copy per task).  Built from
    hiermeta's oldest public names only, so that a --baseline checkout runs it too."""
    import jax.numpy as jnp
    import numpy as np

    import hiermeta as hm

    A = np.vstack([np.eye(8), np.ones((1, 8)) / np.sqrt(8.0)])
    xi = np.array([8.0] * 4 + [5.0] * 4 + [1.0])
    phi, sigma, n = np.ones(8), np.array([8.0] * 4 + [2.0] * 4), 8
    rng = np.random.default_rng(seed)
    theta = phi + sigma * rng.standard_normal((groups, 8))
    obs = (theta @ A.T)[:, None, :] + xi * rng.standard_normal((groups, n, 9))
    data = hm.GaussianData(obs=obs, noise_sd=np.broadcast_to(xi, obs.shape), mask=np.ones((groups, n), bool),
                           inputs=np.broadcast_to(A, (groups, n) + A.shape))
    model = hm.HierarchicalModel(hm.LinearGaussianLikelihood(), hm.ModulePartition.per_coordinate(jnp.zeros(8)))
    return model, data


def child_hiermeta(groups: int, repeats: int, domain: str = "sleepstudy") -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpy as np

    if str(HERE.parent) not in sys.path:  # (with --baseline the older hiermeta is first on PYTHONPATH)
        sys.path.insert(0, str(HERE.parent))
    import hiermeta as hm

    hm.enable_compilation_cache()
    if domain == "paper":
        model, data = paper_data(groups)
    else:
        y, x = simulate(groups)
        lik = hm.linear_gaussian(noise="learned")
        model = hm.HierarchicalModel(lik, hm.ModulePartition.from_labels((0.0, 0.0), ("Intercept", "x")),
                                     correlated=[("Intercept", "x")])
        Z = np.broadcast_to(np.stack([np.ones(N_OBS), x], -1), (groups, N_OBS, 2))
        data = lik.make_data(y, np.ones(y.shape, bool), Z)
        del y, Z
    rss_data = current_rss_mb()
    times, cpu, fit = [], [], None
    t0 = time.perf_counter()
    fit = hm.type2_ml(model, data)
    first = time.perf_counter() - t0
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fit = hm.type2_ml(model, data)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out = {"first_s": first, "times_s": times, "cpu_s": cpu, "rss_data_mb": rss_data, "peak_rss_mb": peak_rss_mb(),
           "phi": fit.phi.tolist(), "sigma": fit.sigma.tolist(), "loglik": fit.log_marginal,
           "converged": fit.converged, "iterations": fit.num_iterations, "hiermeta": hm.__file__}
    if domain != "paper":
        out.update(corr=float(fit.correlation()[0, 1]), noise_sd=float(np.asarray(fit.extra["noise_sd"])))
    return out


def child_statsmodels(groups: int, repeats: int) -> dict:
    import warnings

    import numpy as np
    import statsmodels.api as sm

    y, x = simulate(groups)
    endog = y.ravel()
    exog = np.column_stack([np.ones(endog.size), np.tile(x, groups)])
    g = np.repeat(np.arange(groups), N_OBS)
    rss_data = current_rss_mb()
    times, fit = [], None
    for _ in range(repeats):  # nothing to compile: every fit counts
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = sm.MixedLM(endog, exog, groups=g, exog_re=exog).fit(reml=False)
        times.append(time.perf_counter() - t0)
    first = times[0]
    cov = np.asarray(fit.cov_re)
    sd = np.sqrt(np.diag(cov))
    return {"first_s": first, "times_s": times, "rss_data_mb": rss_data, "peak_rss_mb": peak_rss_mb(),
            "phi": np.asarray(fit.fe_params).tolist(), "sigma": sd.tolist(), "corr": float(cov[0, 1] / (sd[0] * sd[1])),
            "noise_sd": float(np.sqrt(fit.scale)), "loglik": float(fit.llf), "converged": bool(fit.converged),
            "iterations": None}


def run_child(tool: str, groups: int, repeats: int, domain: str = "sleepstudy", baseline: str = "") -> dict:
    env = dict(os.environ)
    env.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
    if baseline:  # the older hiermeta first on the path; models/ and the rest from here
        env["PYTHONPATH"] = os.pathsep.join([baseline, str(HERE.parent)])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", tool, str(groups), str(repeats), domain]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        print(done.stderr[-3000:])
        return {"failed": f"exit {done.returncode}"}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


def difference(a: dict, b: dict) -> float:
    """Largest absolute difference of the estimates (phi, sigma, correlation, noise sd)."""
    import numpy as np

    pairs = [(a["phi"], b["phi"]), (a["sigma"], b["sigma"]), ([a["corr"]], [b["corr"]]), ([a["noise_sd"]], [b["noise_sd"]])]
    return float(max(np.max(np.abs(np.subtract(p, q))) for p, q in pairs))


def main() -> None:
    from common import format_table, note, parser, write_results

    p = parser(__doc__)
    p.add_argument("--sizes", type=int, nargs="+", help="numbers of groups (default 100 .. 10^6; quick to 10^5; "
                   "paper 10^4 .. 10^6)")
    p.add_argument("--statsmodels-max", type=int, help="largest size statsmodels fits (default 10^4, quick 10^3)")
    p.add_argument("--domain", choices=("sleepstudy", "paper"), default="sleepstudy",
                   help="the simulated sleepstudy design (default, against statsmodels) or the paper's linear domain")
    p.add_argument("--baseline", default="", help="a directory holding an older hiermeta to fit beside this one")
    p.add_argument("--baseline-max", type=int, default=100_000, help="largest size the baseline fits (default 10^5)")
    args = p.parse_args()
    if args.domain == "paper":
        return main_paper(args, format_table, note, write_results)
    sizes = args.sizes or ([100, 1000, 10_000, 100_000] if args.quick else [100, 1000, 10_000, 100_000, 1_000_000])
    sm_max = args.statsmodels_max or (1000 if args.quick else 10_000)
    repeats = args.repeats or (2 if args.quick else 3)
    rows, records = [], {}
    for G in sizes:
        hmr = run_child("hiermeta", G, repeats if G < 1_000_000 else max(1, repeats - 1))
        smr = run_child("statsmodels", G, repeats) if G <= sm_max else None
        records[G] = {"hiermeta": hmr, "statsmodels": smr}
        if "failed" in hmr:
            note(f"hiermeta failed at {G} groups: {hmr['failed']}")
            continue
        hm_t = statistics.median(hmr["times_s"])
        row = [G, G * N_OBS, hm_t, hmr["first_s"], hmr["iterations"], hmr["peak_rss_mb"] - hmr["rss_data_mb"],
               hmr["peak_rss_mb"]]
        if smr and "failed" not in smr:
            sm_t = statistics.median(smr["times_s"])
            row += [sm_t, sm_t / hm_t, difference(hmr, smr), abs(hmr["loglik"] - smr["loglik"]),
                    smr["peak_rss_mb"] - smr["rss_data_mb"]]
        else:
            row += ["-"] * 5
        rows.append(row)
        print(format_table(["groups", "obs", "hiermeta s", "first s", "L-BFGS it", "fit MB", "peak MB",
                            "statsmodels s", "sm / hm", "max |est diff|", "|loglik diff|", "sm fit MB"], [row], 4),
              flush=True)
    print(f"\nType-II ML (ML, correlated intercept and slope, learned noise), {N_OBS} observations per group; "
          f"median of {repeats} fits per process (the first, compiling one apart); fit MB: peak resident "
          "memory above what the process held once its data was built")
    print(format_table(["groups", "obs", "hiermeta s", "first s", "L-BFGS it", "fit MB", "peak MB",
                        "statsmodels s", "sm / hm", "max |est diff|", "|loglik diff|", "sm fit MB"], rows, 4))
    write_results(args, "type2_scale", {"sizes": sizes, "statsmodels_max": sm_max, "repeats": repeats,
                                        "truth": {"phi": PHI, "sigma": SIGMA, "corr": CORR, "noise_sd": NOISE},
                                        "records": records})


def main_paper(args, format_table, note, write_results) -> None:
    """The paper's linear domain, 10^4 .. 10^6 tasks, optionally beside a baseline checkout."""
    sizes = args.sizes or ([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    repeats = args.repeats or (3 if args.quick else 5)
    columns = ["tasks", "wall s", "cpu s", "first s", "L-BFGS it", "fit MB", "log marginal",
               "baseline s", "baseline / this", "|diff|", "|diff| per task"]
    rows, records = [], {}
    for G in sizes:
        this = run_child("hiermeta", G, repeats, "paper")
        base = (run_child("hiermeta", G, max(1, min(repeats, 3)), "paper", args.baseline)
                if args.baseline and G <= args.baseline_max else None)
        records[G] = {"hiermeta": this, "baseline": base}
        if "failed" in this:
            note(f"hiermeta failed at {G} tasks: {this['failed']}")
            continue
        wall = statistics.median(this["times_s"])
        row = [G, wall, statistics.median(this["cpu_s"]), this["first_s"], this["iterations"],
               this["peak_rss_mb"] - this["rss_data_mb"], f"{this['loglik']:.10g}"]
        if base and "failed" not in base:
            b = statistics.median(base["times_s"])
            diff = abs(this["loglik"] - base["loglik"])
            row += [b, b / wall, f"{diff:.2e}", f"{diff / G:.2e}"]
        else:
            row += ["-"] * 4
        rows.append(row)
        print(format_table(columns, [row], 4), flush=True)
    print(f"\nType-II ML (ML, exact) on the paper's linear domain (8 coefficients, 8 observations of 9 scalars per "
          f"task); wall and CPU seconds: median of {repeats} warm fits per process (the first, compiling or reading "
          "the persistent cache, apart); fit MB: peak resident memory above the data's")
    print(format_table(columns, rows, 4))
    write_results(args, "type2_scale_paper", {"sizes": sizes, "repeats": repeats, "baseline": args.baseline,
                                              "records": records})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        tool, groups, repeats = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        domain = sys.argv[5] if len(sys.argv) > 5 else "sleepstudy"
        result = child_hiermeta(groups, repeats, domain) if tool == "hiermeta" else child_statsmodels(groups, repeats)
        print(json.dumps(result))
    else:
        sys.path.insert(0, str(HERE))
        main()
