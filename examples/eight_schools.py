"""Eight schools on hiermeta: NUTS against the exact posterior, and the empirical-Bayes estimates of tau.

The schools are 8 tasks with one observation each and known standard errors; the hierarchical
model is hiermeta's Eq. 1 with P = M = 1 (phi = mu, sigma = tau), priors mu ~ N(0, 5),
tau ~ HalfCauchy(5).  The script

* runs NUTS on that model, non-centred (theta = mu + tau z) and centred, 4 chains each, and
  compares the posterior means and sds of mu, tau and the school effects with the exact posterior
  (effects and mu integrated out analytically, tau by quadrature): z = (NUTS - exact) / MCSE;
* computes type-II maximum likelihood of (mu, tau) (the marginal likelihood profiled over mu)
  and the predictive-likelihood estimate of tau (each school's observation split into support
  and query by Gaussian data fission, the PLL taken in expectation over the split), both exact;
* prints them side by side and writes eight_schools.json and eight_schools.png to --out.

    python examples/eight_schools.py            # about 30 s on 2 CPU cores
    python examples/eight_schools.py --quick    # fewer draws
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")  # see README: jaxlib CPU deadlock

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

import hiermeta as hm  # noqa: E402
from hiermeta import posterior as hp  # noqa: E402
from hiermeta.models import eight_schools as es  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py, also when loaded from elsewhere
from _common import MAX_CHAINS, count, format_table, prng_seed, probability, pyplot, save_figure, study_parser, write_json  # noqa: E402


def build_parser():
    p = study_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="fewer draws (smoke run)")
    p.add_argument("--out", default="results", help="output directory for eight_schools.json and eight_schools.png")
    p.add_argument("--seed", type=prng_seed, default=0, help="seed of the NUTS chains")
    p.add_argument("--chains", type=count(1, MAX_CHAINS), default=4, help="NUTS chains per parametrisation")
    p.add_argument("--warmup", type=count(0), help="warm-up iterations per chain (default 1000, quick 500)")
    p.add_argument("--samples", type=count(1), help="draws per chain (default 2500, quick 1000)")
    p.add_argument("--target-accept", type=probability, default=0.9, help="NUTS target acceptance probability, in (0, 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plot", action="store_true", help="write no figure")
    return p


def parse_args(argv=None):
    p = build_parser()
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    hm.enable_compilation_cache()
    warmup = args.warmup if args.warmup is not None else (500 if args.quick else 1000)
    samples = args.samples if args.samples is not None else (1000 if args.quick else 2500)
    out = Path(args.out)
    t_start = time.perf_counter()

    data, model = es.make_data(), es.make_model()
    exact = es.exact_posterior()
    print(f"exact posterior by quadrature: mu {exact.mu_mean:.3f} +- {exact.mu_sd:.3f}, "
          f"tau {exact.tau_mean:.3f} +- {exact.tau_sd:.3f} (median {exact.tau_median:.3f})")

    runs, timings = {}, {}
    for name, noncentred in (("non-centred", True), ("centred", False)):
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=not noncentred) as caught:
            # the centred run is the demonstration of the funnel: its sampling warnings are expected
            if not noncentred:
                warnings.simplefilter("always")
            runs[name] = hp.run_nuts(model, data, jax.random.PRNGKey(args.seed), num_warmup=warmup,
                                     num_samples=samples, num_chains=args.chains, noncentred=noncentred,
                                     target_accept=args.target_accept, progress_bar=not args.no_progress,
                                     task_names=es.SCHOOLS)
        timings[name] = time.perf_counter() - t0
        print(f"[{time.perf_counter() - t_start:6.1f}s] NUTS {name}: {args.chains} x {samples} draws, "
              f"{runs[name].num_divergences} divergences, {timings[name]:.1f}s")
        if caught:
            print("  (expected, the point of this run: the centred parametrisation samples the funnel between tau "
                  "and the effects badly; hiermeta warned, as it does for any model:\n   "
                  + "\n   ".join(str(w.message) for w in caught) + ")")

    # ---------------------------------------------------------------- NUTS against the exact posterior
    names = ["mu", "tau"] + [f"theta[{s}]" for s in es.SCHOOLS]
    # the same quantities as labelled by ArviZ (phi[param], sigma[module], theta[param, task]; P = M = 1)
    labels = ["phi[0]", f"sigma[{model.partition.names[0]}]"] + [f"theta[0, {s}]" for s in es.SCHOOLS]
    want_mean = np.concatenate([[exact.mu_mean, exact.tau_mean], exact.theta_mean])
    want_sd = np.concatenate([[exact.mu_sd, exact.tau_sd], exact.theta_sd])
    tables, rows = {}, []
    for name, result in runs.items():
        table = hp.summary(result, ["phi", "sigma", "theta"]).loc[labels]
        tables[name] = table
        for i, label in enumerate(names):
            r = table.iloc[i]
            z_mean = (r["mean"] - want_mean[i]) / r["mcse_mean"]
            z_sd = (r["sd"] - want_sd[i]) / r["mcse_sd"]
            if name == "non-centred" or label in ("mu", "tau"):
                rows.append([f"{label} ({name})", want_mean[i], r["mean"], r["mcse_mean"], z_mean,
                             want_sd[i], r["sd"], z_sd, int(r["ess_bulk"]), f"{r['r_hat']:.3f}"])
    print("\nNUTS against the exact posterior (z = (NUTS - exact) / MCSE; divergences: "
          + ", ".join(f"{k} {v.num_divergences}" for k, v in runs.items()) + ")")
    print(format_table(["quantity", "exact mean", "NUTS mean", "mcse", "z", "exact sd", "NUTS sd", "z(sd)",
                        "ess_bulk", "r_hat"], rows, 3))
    calibration = z_calibration(rows, "non-centred")
    print(f"non-centred: {calibration['num_scores']} z-scores, largest |z| {calibration['max_abs_z']:.2f} "
          f"({calibration['max_at']}); {calibration['num_above_2']} above 2 where {calibration['expected_above_2']:.2f} "
          f"are expected by chance; Bonferroni bound at family-wise {calibration['family_alpha']:.0%}: "
          f"{calibration['bonferroni_bound']:.2f} ({'within' if calibration['within_bound'] else 'OUTSIDE'})")

    # ---------------------------------------------------------------- empirical Bayes
    t2 = es.type2_ml()
    pll = es.pll_estimate()
    nc = tables["non-centred"]
    est_rows = [
        ["posterior mean (exact)", exact.mu_mean, exact.tau_mean, "quadrature"],
        ["posterior median (exact)", "", exact.tau_median, "quadrature"],
        ["posterior mean (NUTS)", nc.iloc[0]["mean"], nc.iloc[1]["mean"], "non-centred NUTS"],
        ["type-II ML", t2["mu"], t2["tau"], "0 (boundary)" if t2["boundary"] else "interior"],
        ["PLL, exact gradient", pll["pll_mu"], pll["pll_tau"], "0 (boundary)" if pll["pll_boundary"] else "interior"],
        ["PLL, Eq. 4 fixed point", pll["pll_mu"] if pll["eq4_tau"] == pll["pll_tau"] else "", pll["eq4_tau"],
         "0 (boundary)" if pll["eq4_boundary"] else "interior"],
    ]
    print("\nEstimates of mu and tau (PLL: support/query by Gaussian data fission, expected over the split)")
    print(format_table(["estimate", "mu", "tau", "note"], est_rows, 3))
    print(f"type-II ML: d(profile log marginal)/d(tau^2) at 0 = {t2['slope_at_zero']:.4f} < 0, so tau = 0 "
          f"is the maximum; log marginal {t2['log_marginal']:.3f}")
    print(f"total {time.perf_counter() - t_start:.1f}s")

    # ---------------------------------------------------------------- JSON + figure
    taus = np.linspace(0.0, 30.0, 301)
    profile = np.array([es.profile_log_marginal(t)[0] for t in taus])
    pll_curve = np.array([np.sum(es.fission_pll(es._map_mu(t, es.Y, es.SE), t)) for t in taus])
    payload = {
        "schema": "hiermeta/eight_schools/v1",
        "config": {**vars(args), "warmup": warmup, "samples": samples, "priors": "mu ~ N(0, 5), tau ~ HalfCauchy(5)",
                   "jax_version": jax.__version__},
        "data": {"y": es.Y, "se": es.SE, "schools": es.SCHOOLS},
        "exact": {"mu_mean": exact.mu_mean, "mu_sd": exact.mu_sd, "tau_mean": exact.tau_mean, "tau_sd": exact.tau_sd,
                  "tau_median": exact.tau_median, "theta_mean": exact.theta_mean, "theta_sd": exact.theta_sd},
        "nuts": {name: {"num_divergences": r.num_divergences, "seconds": timings[name],
                        "summary": {col: tables[name][col].to_numpy() for col in tables[name].columns},
                        "rows": names}
                 for name, r in runs.items()},
        "z_calibration": calibration,
        "empirical_bayes": {"type2_ml": t2, "pll": pll},
        "curves": {"tau": taus, "profile_log_marginal": profile, "expected_fission_pll": pll_curve},
        "timings_seconds": {"total": time.perf_counter() - t_start},
    }
    path = write_json(out / "eight_schools.json", payload)
    print(f"wrote {path}")
    if not args.no_plot:
        print(f"wrote {plot(out / 'eight_schools.png', runs, exact, taus, profile, pll_curve)}")
    return payload


def z_calibration(rows, name, family_alpha=0.01) -> dict:
    """The z-scores of one run judged together: with n scores from a sampler that is right, each
    |z| > 2 has probability 0.0455 (n x 0.0455 expected), and the largest exceeds the Bonferroni
    bound Phi^-1(1 - alpha / (2 n)) with probability at most alpha (the bound the tests use)."""
    from scipy import stats

    mine = [r for r in rows if r[0].endswith(f"({name})")]
    scores = [(r[0].rsplit(" (", 1)[0] + label, float(r[i])) for r in mine for i, label in ((4, ""), (7, " sd"))]
    n = len(scores)
    at, z = max(scores, key=lambda s: abs(s[1]))
    bound = float(stats.norm.ppf(1 - family_alpha / (2 * n)))
    return {"run": name, "num_scores": n, "max_abs_z": abs(z), "max_at": at,
            "num_above_2": sum(abs(v) > 2 for _, v in scores), "expected_above_2": n * 2 * float(stats.norm.sf(2)),
            "family_alpha": family_alpha, "bonferroni_bound": bound, "within_bound": abs(z) < bound,
            "scores": dict(scores)}


def plot(path, runs, exact, taus, profile, pll_curve):
    plt = pyplot()
    from scipy import integrate

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
    grid = np.linspace(0.0, 25, 500)
    unnorm = lambda t: np.exp(es.log_evidence_given_tau(t)[0]) * 2 / (np.pi * 5 * (1 + (t / 5) ** 2))
    total = integrate.quad(unnorm, 0, np.inf, epsrel=1e-10)[0]
    ax0.plot(grid, [unnorm(t) / total for t in grid], "k", label="exact (quadrature)")
    for name, r in runs.items():
        ax0.hist(r.flat("sigma")[:, 0], bins=np.linspace(0, 25, 80), density=True, histtype="step",
                 label=f"NUTS {name} ({r.num_divergences} div.)")
    ax0.set_xlabel("tau")
    ax0.set_ylabel("posterior density")
    ax0.set_title("Eight schools: posterior of tau")
    ax0.legend(fontsize=8)
    ax1.plot(taus, profile - profile.max(), label="type-II ML: profile log marginal")
    ax1.plot(taus, pll_curve - pll_curve.max(), label="PLL (fission, expected)")
    ax1.axvline(exact.tau_mean, color="k", linestyle=":", label="posterior mean")
    ax1.set_xlabel("tau")
    ax1.set_ylabel("criterion minus its maximum")
    ax1.set_title("Empirical-Bayes criteria: both maximal at tau = 0")
    ax1.legend(fontsize=8)
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
