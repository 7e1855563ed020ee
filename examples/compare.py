"""The paper's comparison (its Figure 3 and appendix Figures 6-7): every method on both domains.

Methods: Shrinkage, M-Shrinkage, sigma-iMAML and M-sigma-iMAML (when hiermeta has them), MAML,
M-MAML, FOMAML, FO-M-MAML, Reptile and M-Shrinkage MAP.  For each domain (linear: Experiment 1,
swirl: Experiment 2) and each method:

1. hyperparameter search: every candidate of the method's grid (below, and in the JSON) is
   meta-trained on the same task stream and adapted to a fixed set of *validation* tasks for
   0..K_test steps; the candidate with the lowest validation loss at its best step wins
   (``examples/_search.py``);
2. the winner is adapted to 1000 *held-out* tasks (never used for any choice) for 0..K_test steps
   (200 linear, 1000 swirl); reported: the best mean loss and its step, the loss at the step chosen
   on the validation tasks, and the loss at the last step, beside exact or Monte-Carlo references.

    python examples/compare.py                    # both domains, full search (about an hour on 2 cores)
    python examples/compare.py --domain swirl     # one domain
    python examples/compare.py --quick            # smoke run: one candidate per method, few steps
    python examples/compare.py --methods MAML,Reptile --out DIR
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import hiermeta as hm  # noqa: E402
from hiermeta.models import linear, swirl  # noqa: E402

from hiermeta.learners import m_sigma_imaml, sigma_imaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py, also when loaded from elsewhere
from _common import count, format_table, plot_loss_curves, prng_seed, pyplot, save_figure, study_parser, write_json  # noqa: E402
from _search import Candidate, curve_summary, search, try_evaluate  # noqa: E402

# ------------------------------------------------------------------ search grids (documented in the JSON)
GRIDS = {
    "linear": {
        "prior": {"inner_lr": [0.1, 0.3], "inner_steps": [50, 200]},
        "maml": {"inner_steps": [5, 20, 100], "init_lr": [0.03, 0.1]},
        "reptile": {"inner_lr": [0.1, 0.3], "inner_steps": [10, 50], "beta": [0.3, 1.0]},
    },
    "swirl": {
        "prior": {"inner_lr": [0.03, 0.1], "inner_steps": [100, 500]},
        "maml": {"inner_steps": [10, 50, 200], "init_lr": [0.01, 0.05]},
        "reptile": {"inner_lr": [0.03, 0.1], "inner_steps": [10, 100], "beta": [0.3, 1.0]},
    },
}
QUICK_GRIDS = {
    "linear": {"prior": {"inner_lr": [0.3], "inner_steps": [50]}, "maml": {"inner_steps": [5], "init_lr": [0.1]},
               "reptile": {"inner_lr": [0.3], "inner_steps": [10], "beta": [1.0]}},
    "swirl": {"prior": {"inner_lr": [0.1], "inner_steps": [50]}, "maml": {"inner_steps": [10], "init_lr": [0.05]},
              "reptile": {"inner_lr": [0.1], "inner_steps": [10], "beta": [1.0]}},
}
FIXED = {"outer": "Adam, lr 0.03 cosine-decayed to 0.003 (Reptile: SGD at beta, cosine-decayed to 0.1 beta)",
         "init_sigma": 1.0, "init_phi": 0.0, "batch_size": 25}


def method_candidates(model, grid: dict, meta_steps: int) -> dict:
    """Candidate learners per method, built from the grid."""
    adam = lambda: optax.adam(optax.cosine_decay_schedule(0.03, meta_steps, alpha=0.1))

    def expand(space):
        keys = list(space)
        return [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]

    def prior(factory, **fixed):
        return [Candidate(c, lambda c=c: factory(model, inner_optimizer=optax.sgd(c["inner_lr"]),
                                                 inner_steps=c["inner_steps"], outer_optimizer=adam(),
                                                 init_sigma=FIXED["init_sigma"], **fixed))
                for c in expand(grid["prior"])]

    def maml(**flags):
        return [Candidate(c, lambda c=c: hm.maml(model, inner_steps=c["inner_steps"], init_lr=c["init_lr"],
                                                 outer_optimizer=adam(), **flags))
                for c in expand(grid["maml"])]

    def reptile():
        def build(c):
            beta = optax.cosine_decay_schedule(c["beta"], meta_steps, alpha=0.1)
            return hm.reptile(model, inner_optimizer=optax.sgd(c["inner_lr"]), inner_steps=c["inner_steps"],
                              outer_optimizer=optax.sgd(beta))
        return [Candidate(c, lambda c=c: build(c)) for c in expand(grid["reptile"])]

    methods = {
        "Shrinkage": prior(hm.shrinkage, modular=False),
        "M-Shrinkage": prior(hm.shrinkage, modular=True),
    }
    if sigma_imaml is not None:
        methods["sigma-iMAML"] = prior(sigma_imaml)
        methods["M-sigma-iMAML"] = prior(m_sigma_imaml)
    methods.update({
        "MAML": maml(),
        "M-MAML": maml(modular=True),
        "FOMAML": maml(first_order=True),
        "FO-M-MAML": maml(modular=True, first_order=True),
        "Reptile": reptile(),
        "M-Shrinkage MAP": prior(hm.m_shrinkage_map),
    })
    return methods


# ------------------------------------------------------------------ domains and their references
def linear_domain(test, val):
    domain = linear.paper_domain()
    model = linear.make_model(domain.num_params)
    sem = lambda x: float(np.std(x, ddof=1) / np.sqrt(len(x)))
    loss = jax.vmap(model.generalisation_loss)

    def references(tasks):
        oracle, _ = linear.posterior(tasks.train, domain.phi, domain.sigma)
        mle, _ = linear.posterior(tasks.train, domain.phi, np.full(domain.num_params, np.inf))
        per_task = {"Bayes oracle (posterior mean = MAP)": np.asarray(loss(oracle, tasks.val)),
                    "MLE": np.asarray(loss(mle, tasks.val))}
        expected = {"Bayes oracle (posterior mean = MAP)": linear.expected_loss(domain, domain.phi, domain.sigma),
                    "MLE": linear.expected_loss(domain, domain.phi, np.inf)}
        return {name: {"held_out": float(v.mean()), "held_out_sem": sem(v), "expected": expected[name],
                       "per_task": v} for name, v in per_task.items()}

    sample = lambda key, n: linear.sample_tasks(domain, key, n)[1]
    truth = {"phi": domain.phi, "sigma": domain.sigma, "noise_sd": domain.noise_sd, "design": domain.design,
             "n_train": domain.n_train, "n_val": domain.n_val}
    return domain, model, sample, references, truth


def swirl_domain(test, val):
    domain = swirl.paper_domain()
    model = swirl.make_model(domain)
    sem = lambda x: float(np.std(x, ddof=1) / np.sqrt(len(x)))
    names = {"oracle_map": "Bayes oracle (global MAP)", "local_map": "MAP from phi (true prior)",
             "posterior_mean": "posterior mean of mu", "mle": "MLE"}

    def references(tasks):
        ref = swirl.reference_losses(model, domain, tasks)
        out = {names[k]: {"held_out": float(ref[k].mean()), "held_out_sem": sem(ref[k]), "per_task": ref[k]}
               for k in names}
        out["MLE"]["expected"] = swirl.mle_expected_loss(domain)
        out["Bayes oracle (global MAP)"]["max_grad_norm"] = ref["oracle_grad_norm"]
        return out

    sample = lambda key, n: swirl.sample_tasks(domain, key, n)[1]
    truth = {"phi": domain.phi, "sigma": domain.sigma, "noise_sd": domain.noise_sd, "omega": domain.omega,
             "n_train": domain.n_train, "n_val": domain.n_val}
    return domain, model, sample, references, truth


DOMAINS = {"linear": linear_domain, "swirl": swirl_domain}


def learned_values(state) -> dict:
    p = state.params
    out = {"phi": np.asarray(p["phi"])}
    if "log_sigma2" in p:
        out["sigma"] = np.exp(0.5 * np.asarray(p["log_sigma2"]))
    if "log_lr" in p:
        out["lr"] = np.exp(np.asarray(p["log_lr"]))
    return out


# ------------------------------------------------------------------ one domain
def run_domain(name, args, log):
    t_start = time.perf_counter()
    quick = args.quick
    pick = lambda value, default: value if value is not None else default
    meta_steps = pick(args.meta_steps, 60 if quick else {"linear": 3000, "swirl": 2000}[name])
    eval_steps = pick(args.eval_steps, (50 if name == "linear" else 100) if quick else {"linear": 200, "swirl": 1000}[name])
    n_test = pick(args.test_tasks, 100 if quick else 1000)
    n_val = pick(args.val_tasks, 100 if quick else 500)  # quick: same shape as the test set, one compilation
    grid = (QUICK_GRIDS if quick else GRIDS)[name]

    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(args.seed), list(DOMAINS).index(name)), 4)
    k_train, k_val, k_test, k_init = keys
    domain, model, sample, references, truth = DOMAINS[name](n_test, n_val)
    val_tasks, test_tasks = sample(k_val, n_val), sample(k_test, n_test)
    sample_batch = lambda key: sample(key, FIXED["batch_size"])
    init_params = jnp.zeros(domain.num_params)
    methods = method_candidates(model, grid, meta_steps)
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",")]
        unknown = [m for m in wanted if m not in methods]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; available: {list(methods)}")
        methods = {m: methods[m] for m in wanted}

    log(f"\n=== {name} domain: {meta_steps} meta-steps of {FIXED['batch_size']} tasks per candidate, "
        f"{n_val} validation tasks, {n_test} held-out tasks, 0..{eval_steps} adaptation steps")
    refs = references(test_tasks)
    log(f"[{time.perf_counter() - t_start:6.1f}s] references on the held-out tasks: "
        + ", ".join(f"{k} {v['held_out']:.3f}" for k, v in refs.items()))

    results, search_log, curves = {}, {}, {}
    for method, candidates in methods.items():
        best, trials = search(candidates, init_params, sample_batch, meta_steps, data_key=k_train, init_key=k_init,
                              val_tasks=val_tasks, eval_steps=eval_steps, name=method, progress=not args.no_progress,
                              log=log)
        search_log[method] = [t.to_dict() for t in trials]
        curve, status = try_evaluate(best.learner, best.state, test_tasks, eval_steps)
        if curve is not None:
            curves[method] = curve
        results[method] = {"config": best.config, "status": best.status if status == "ok" else status,
                           "num_skipped": int(best.state.num_skipped), "curve": curve,
                           "summary": curve_summary(curve, best.step), **learned_values(best.state)}
    paired_differences(results, curves)
    oracle_name = next(iter(refs))  # the Bayes oracle: first reference
    for method, r in results.items():
        if method in curves:
            d = curves[method].per_task[:, r["summary"]["chosen_step"]] - refs[oracle_name]["per_task"]
            r["paired_vs_oracle_at_val_step"] = {"reference": oracle_name, "mean": float(d.mean()),
                                                 "sem": float(d.std(ddof=1) / np.sqrt(len(d)))}
    log(f"[{time.perf_counter() - t_start:6.1f}s] {name}: search and held-out evaluation done")
    return {"meta_steps": meta_steps, "eval_steps": eval_steps, "test_tasks": n_test, "val_tasks": n_val,
            "grid": grid, "truth": truth, "references": refs, "methods": results, "search": search_log,
            "curves": curves, "seconds": time.perf_counter() - t_start}


def paired_differences(results, curves, base="M-Shrinkage"):
    """Per method, its held-out loss minus ``base``'s over the same tasks (mean and SEM), at each
    one's validation-chosen step and at the last step."""
    if base not in curves:
        return
    sem = lambda d: float(d.std(ddof=1) / np.sqrt(len(d)))
    b_step = results[base]["summary"]["chosen_step"]
    for method, r in results.items():
        if method == base or method not in curves:
            continue
        per_task, base_tasks = curves[method].per_task, curves[base].per_task
        at_val = per_task[:, r["summary"]["chosen_step"]] - base_tasks[:, b_step]
        last = per_task[:, -1] - base_tasks[:, -1]
        r["paired_vs_" + base] = {"at_val_step": {"mean": float(at_val.mean()), "sem": sem(at_val)},
                                  "last": {"mean": float(last.mean()), "sem": sem(last)}}


def report_domain(name, res, log):
    refs, methods = res["references"], res["methods"]
    last = res["eval_steps"]
    rows = []
    for method, r in methods.items():
        s = r["summary"]
        paired = r.get("paired_vs_M-Shrinkage")
        fmt = lambda d: f"{d['mean']:+.3f}+-{d['sem']:.3f}"
        diffs = [fmt(paired["at_val_step"]), fmt(paired["last"])] if paired else ["", ""]
        rows.append([method, s["best"], s["best_step"], s.get("at_chosen", float("nan")), s.get("chosen_step", -1),
                     s["last"], f"+-{s.get('last_sem', float('nan')):.3f}", *diffs, r["num_skipped"],
                     " ".join(f"{k}={v}" for k, v in r["config"].items())])
    for ref, v in refs.items():
        rows.append([ref, "", "", "", "", v["held_out"], f"+-{v['held_out_sem']:.3f}", "", "", "",
                     f"expected {v['expected']:.3f}" if "expected" in v else ""])
    log(f"\n{name}: generalisation loss on {res['test_tasks']} held-out tasks (best over 0..{last} steps and its "
        f"step; at the step chosen on validation tasks; at step {last})")
    log(format_table(["method", "best", "step", "at val step", "val step", f"k={last}", "sem",
                      "vs M-Shr. val step", f"vs M-Shr. k={last}", "skipped", "chosen config"], rows))
    log("(vs M-Shr.: paired difference to M-Shrinkage over the same tasks, each at its validation-chosen step, "
        f"and both at step {last}; mean +- SEM)")
    oracle_rows = [[m, r["summary"]["chosen_step"], r["paired_vs_oracle_at_val_step"]["mean"],
                    r["paired_vs_oracle_at_val_step"]["sem"]] for m, r in methods.items() if "paired_vs_oracle_at_val_step" in r]
    if oracle_rows:
        log(f"paired difference to the {next(iter(refs))} over the same tasks, at the validation-chosen step")
        log(format_table(["method", "val step", "minus oracle", "sem"], oracle_rows, 4))
    sig_rows = [[m, *np.round(np.broadcast_to(r["sigma"], np.shape(res["truth"]["sigma"])), 2)]
                for m, r in methods.items() if "sigma" in r]
    if sig_rows:
        log("learned sigma per module (truth first)")
        log(format_table(["method", *[f"s{i + 1}" for i in range(len(res['truth']['sigma']))]],
                         [["truth", *res["truth"]["sigma"]], *sig_rows], 2))
    lr_rows = [[m, *np.round(np.broadcast_to(r["lr"], np.shape(res["truth"]["sigma"])), 3)]
               for m, r in methods.items() if "lr" in r]
    if lr_rows:
        log("learned inner learning rate per module")
        log(format_table(["method", *[f"a{i + 1}" for i in range(len(res['truth']['sigma']))]], lr_rows, 3))


def plot(path, results):
    plt = pyplot()

    fig, axes = plt.subplots(1, len(results), figsize=(7.5 * len(results), 5), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        refs = {k: v["held_out"] for k, v in res["references"].items()}
        top = max(refs.values()) + 0.8
        curves = {(m if c.mean.min() < top else f"{m} (off scale, min {c.mean.min():.2f})"): c
                  for m, c in res["curves"].items()}
        plot_loss_curves(ax, curves)
        for (ref, value), style in zip(refs.items(), ["--", ":", "-.", (0, (1, 4))]):
            ax.axhline(value, color="k", linestyle=style, linewidth=1, label=f"{ref} (held-out)")
        ax.set_ylim(min(refs.values()) - 0.2, top)
        if name == "swirl":
            ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(0, res["eval_steps"])
        ax.legend(fontsize=7, loc="upper right", ncol=2)
        ax.set_title(f"{name} domain: held-out loss (band: 68% CI of the mean)")
    return save_figure(fig, path)


def build_parser():
    p = study_parser(__doc__)
    p.add_argument("--domain", choices=["linear", "swirl", "both"], default="both", help="which domain(s) to run")
    p.add_argument("--quick", action="store_true", help="smoke run: one candidate per method, few steps and tasks")
    p.add_argument("--methods", help="comma-separated subset of methods (default: all)")
    p.add_argument("--out", default="results", help="output directory for compare.json and compare.png")
    p.add_argument("--seed", type=prng_seed, default=0, help="seed of the task streams, validation and held-out tasks")
    p.add_argument("--meta-steps", type=count(1), help="meta-steps per candidate (default linear 3000, swirl 2000; quick 60)")
    p.add_argument("--eval-steps", type=count(1), help="adaptation steps evaluated (default linear 200, swirl 1000; quick 50, 100)")
    p.add_argument("--test-tasks", type=count(2), help="held-out tasks (default 1000, quick 100)")
    p.add_argument("--val-tasks", type=count(1), help="validation tasks for the search (default 500, quick 100)")
    p.add_argument("--no-plot", action="store_true", help="write no figure")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the per-candidate lines remain)")
    return p


def parse_args(argv=None):
    p = build_parser()
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    hm.enable_compilation_cache()
    t_start = time.perf_counter()
    log = lambda msg: print(msg, flush=True)
    names = ["linear", "swirl"] if args.domain == "both" else [args.domain]
    results = {name: run_domain(name, args, log) for name in names}
    for name, res in results.items():
        report_domain(name, res, log)

    payload = {
        "schema": "hiermeta/compare/v1",
        "config": {**vars(args), "fixed": FIXED, "selection": "lowest mean validation loss over adaptation steps",
                   "sigma_imaml_present": sigma_imaml is not None, "jax_version": jax.__version__},
        "domains": {},
        "timings_seconds": {"total": time.perf_counter() - t_start},
    }
    for name, res in results.items():
        entry = {k: v for k, v in res.items() if k not in ("curves",)}
        entry["references"] = {k: {kk: vv for kk, vv in v.items() if kk != "per_task"} for k, v in res["references"].items()}
        entry["timings_seconds"] = entry.pop("seconds")
        payload["domains"][name] = entry
    out = Path(args.out)
    path = write_json(out / "compare.json", payload)
    log(f"wrote {path}")
    if not args.no_plot:
        log(f"wrote {plot(out / 'compare.png', results)}")
    log(f"total {time.perf_counter() - t_start:.1f}s")
    return payload


if __name__ == "__main__":
    main()
