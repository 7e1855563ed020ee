"""The main job: Experiment 1 of Chen et al. (linear-Gaussian domain) against exact answers.

Meta-trains Shrinkage (one sigma) and M-Shrinkage (one sigma per coordinate; both with the
paper's Eq. 4 sigma-gradient) and M-sigma-iMAML (phi and one sigma per coordinate by the exact
PLL hypergradient, conjugate gradient) on fresh tasks, fits exact type-II maximum likelihood,
then adapts every method to held-out tasks for 0..200 steps and prints the generalisation loss
beside the Bayes oracle and the MLE.

    python examples/linear_toy.py            # about a minute on 2 CPU cores
    python examples/linear_toy.py --quick    # smoke run, well under 30 s
    python examples/linear_toy.py --out DIR  # linear_toy.json and linear_toy.png in DIR (default results/)
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from scipy.optimize import brentq, minimize_scalar  # noqa: E402

import hiermeta as hm  # noqa: E402
from hiermeta.learners import shrinkage_params, sigma_of  # noqa: E402
from hiermeta.models import linear  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py, also when loaded from elsewhere
from _common import count, format_table, plot_loss_curves, positive_float, prng_seed, pyplot, save_figure, study_parser, write_json  # noqa: E402

REPORT_STEPS = (0, 25, 50, 100, 200)
PHASES: list = []  # (name, start, end) in time.perf_counter() seconds, one entry per phase of the last main()


@contextlib.contextmanager
def phase(name: str):
    """Record the wall time of one phase of the job (benchmarks/startup.py reads ``PHASES``)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        PHASES.append((name, start, time.perf_counter()))


def build_parser():
    p = study_parser(__doc__)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 300 meta-steps, 200 held-out tasks (the sigmas do not converge)")
    p.add_argument("--out", default="results", help="output directory for linear_toy.json and linear_toy.png")
    p.add_argument("--seed", type=prng_seed, default=0, help="seed of the task streams, the held-out tasks and the initial state")
    p.add_argument("--meta-steps", type=count(1), help="meta-iterations per learner (default 3000, quick 300)")
    p.add_argument("--batch-size", type=count(1), default=25, help="tasks per meta-iteration")
    p.add_argument("--inner-steps", type=count(1), default=200, help="K, inner SGD steps while meta-training")
    p.add_argument("--inner-lr", type=positive_float, default=0.3, help="inner SGD learning rate")
    p.add_argument("--outer-lr", type=positive_float, default=0.03, help="initial Adam learning rate (cosine-decayed)")
    p.add_argument("--test-tasks", type=count(2), help="held-out tasks (default 1000, quick 200)")
    p.add_argument("--test-steps", type=count(1), default=200, help="adaptation steps evaluated (0..this)")
    p.add_argument("--type2-tasks", type=count(1), help="tasks for exact type-II ML (default 10000, quick 2000)")
    p.add_argument("--no-plot", action="store_true", help="write no figure")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    PHASES.clear()
    t_start = time.perf_counter()
    with phase("setup"):
        hm.enable_compilation_cache()
        pick = lambda value, quick, full: value if value is not None else (quick if args.quick else full)
        meta_steps = pick(args.meta_steps, 300, 3000)
        test_tasks = pick(args.test_tasks, 200, 1000)
        type2_tasks = pick(args.type2_tasks, 2000, 10000)
        out = Path(args.out)

        domain = linear.paper_domain()
        model = linear.make_model(domain.num_params)  # every coordinate its own module
        key_train, key_test, key_type2, key_init = jax.random.split(jax.random.PRNGKey(args.seed), 4)
        sample_batch = lambda key: linear.sample_tasks(domain, key, args.batch_size)[1]
        schedule = optax.cosine_decay_schedule(args.outer_lr, meta_steps, alpha=0.1)
        config = dict(
            inner_optimizer=optax.sgd(args.inner_lr),
            inner_steps=args.inner_steps,
            outer_optimizer=optax.adam(schedule),
            init_sigma=1.0,
        )
        learners = {
            "Shrinkage": hm.shrinkage(model, modular=False, **config),
            "M-Shrinkage": hm.m_shrinkage(model, **config),
            "M-sigma-iMAML": hm.m_sigma_imaml(model, **config),  # exact hypergradient (CG) for phi and sigma
        }

    # ---------------------------------------------------------------- the tasks of type-II ML and evaluation
    with phase("sampling"):
        _, type2_batch = linear.sample_tasks(domain, key_type2, type2_tasks)
        _, test = linear.sample_tasks(domain, key_test, test_tasks)

    # ---------------------------------------------------------------- meta-training
    states, histories, train_seconds = {}, {}, {}
    with phase("training"):
        for name, learner in learners.items():
            t0 = time.perf_counter()
            state = learner.init(key_init, jnp.zeros(domain.num_params))
            state, history = hm.fit(learner, state, sample_batch, meta_steps, data_key=key_train, description=name)
            train_seconds[name] = time.perf_counter() - t0
            states[name], histories[name] = state, history
            print(f"[{time.perf_counter() - t_start:6.1f}s] meta-trained {name}: {meta_steps} steps "
                  f"in {train_seconds[name]:.1f}s ({int(state.num_skipped)} skipped)")

    # ---------------------------------------------------------------- exact type-II ML
    with phase("type-II ML"):
        t0 = time.perf_counter()
        type2 = linear.fit_type2_ml(linear.merge_splits(type2_batch), model)
        type2_seconds = time.perf_counter() - t0
        print(f"[{time.perf_counter() - t_start:6.1f}s] type-II ML on {type2_tasks} tasks: "
              f"{type2.num_iterations} L-BFGS iterations, |grad| {type2.grad_norm:.1e}")

    # ---------------------------------------------------------------- held-out evaluation
    with phase("evaluation"):
        m_learner = learners["M-Shrinkage"]
        fixed = {  # the same inner loop, at fixed (phi, sigma)
            "Type-II ML (MAP)": shrinkage_params(model, type2.phi, type2.sigma),
            "Oracle (MAP)": shrinkage_params(model, domain.phi, domain.sigma),
        }
        curves = {}
        for name, learner in learners.items():
            curves[name] = hm.evaluate(learner, states[name], test, args.test_steps)
        for name, params in fixed.items():
            curves[name] = hm.evaluate(m_learner, states["M-Shrinkage"]._replace(params=params), test, args.test_steps)
        print(f"[{time.perf_counter() - t_start:6.1f}s] evaluated {len(curves)} methods on {test_tasks} "
              f"held-out tasks, 0..{args.test_steps} steps")

        # exact references: closed-form expectations and the exact estimators on these same tasks
        oracle_tasks, mle_tasks = (np.asarray(a) for a in linear.reference_losses(model, test, domain.phi, domain.sigma))
        sem = lambda x: float(np.std(x, ddof=1) / np.sqrt(len(x)))
        shared_eq4 = float(np.exp(brentq(lambda ls: linear.expected_eq4_gradient(domain, np.exp(ls)).sum(), -3.0, 5.0)))
        shared_opt = float(np.exp(minimize_scalar(lambda ls: linear.expected_loss(domain, domain.phi, np.exp(ls)),
                                                  bounds=(-3.0, 5.0), method="bounded").x))
        references = {
            "shared_sigma": {"eq4_fixed_point": shared_eq4, "pll_optimum": shared_opt},
            "oracle": {"expected": linear.expected_loss(domain, domain.phi, domain.sigma),
                       "held_out": float(oracle_tasks.mean()), "held_out_sem": sem(oracle_tasks)},
            "mle": {"expected": linear.expected_loss(domain, domain.phi, np.inf),
                    "held_out": float(mle_tasks.mean()), "held_out_sem": sem(mle_tasks)},
        }

    # ---------------------------------------------------------------- report
    with phase("report"):
        learned = {
            name: (np.asarray(states[name].params["phi"]), np.asarray(sigma_of(states[name].params, model.partition.num_modules)))
            for name in learners
        }
        learned["Type-II ML"] = (type2.phi, type2.sigma)
        steps = [s for s in REPORT_STEPS if s <= args.test_steps]
        last = args.test_steps

        print("\nLearned sigma per module (truth first); phi error = max_m |phi_m - 1|")
        sigma_rows = [["truth", *domain.sigma, 0.0]]
        sigma_rows += [[name, *sigma, np.max(np.abs(phi - domain.phi))] for name, (phi, sigma) in learned.items()]
        print(format_table(["method", *[f"s{m + 1}" for m in range(domain.num_params)], "phi err"], sigma_rows, 2))
        print(sigma_verdict(args.quick, meta_steps, list(learners), shared_eq4, shared_opt))

        print(f"\nGeneralisation loss on {test_tasks} held-out tasks (mean over tasks; +- is the SEM at "
              f"step {last}); exact E[loss] is the closed-form expectation for the converged MAP")
        loss_rows = []
        expected_at = {name: linear.expected_loss(domain, phi, sigma) for name, (phi, sigma) in learned.items()}
        expected_at["Type-II ML (MAP)"] = expected_at.pop("Type-II ML")
        expected_at["Oracle (MAP)"] = references["oracle"]["expected"]
        for name, curve in curves.items():
            row = [name, *[curve.at(s) for s in steps], f"+-{curve.sem[last]:.3f}", expected_at[name]]
            loss_rows.append(row)
        for ref, label in (("oracle", "Bayes oracle (posterior mean)"), ("mle", "MLE")):
            r = references[ref]
            loss_rows.append([label, *["" for _ in steps[:-1]], r["held_out"], f"+-{r['held_out_sem']:.3f}", r["expected"]])
        print(format_table(["method", *[f"k={s}" for s in steps], "sem", "exact E[loss]"], loss_rows))

        print()
        paired = {}
        for name in ("M-Shrinkage", "M-sigma-iMAML"):
            gap = curves[name].per_task[:, last] - oracle_tasks
            paired[name] = {"step": last, "mean": float(gap.mean()), "sem": float(sem(gap))}
            print(f"{name} minus Bayes oracle at step {last}, paired over the same tasks: "
                  f"{gap.mean():+.4f} +- {sem(gap):.4f}")
        h = histories["M-sigma-iMAML"]
        print(f"M-sigma-iMAML conjugate gradient: at most {int(h['cg_iterations'].max())} iterations per task, "
              f"worst relative residual {float(h['cg_residual'].max()):.1e} over {meta_steps} meta-steps")
        print(f"total {time.perf_counter() - t_start:.1f}s")

    # ---------------------------------------------------------------- JSON + figure
    with phase("report"):
        every = max(1, meta_steps // 200)
        payload = {
            "schema": "hiermeta/linear_toy/v1",
            "config": {**{k: v for k, v in vars(args).items()}, "meta_steps": meta_steps, "test_tasks": test_tasks,
                       "type2_tasks": type2_tasks, "outer_schedule": "adam, cosine decay to 0.1x", "init_sigma": 1.0,
                       "modules": list(model.partition.names), "jax_version": jax.__version__},
            "truth": {"phi": domain.phi, "sigma": domain.sigma, "noise_sd": domain.noise_sd, "design": domain.design},
            "references": references,
            "minus_bayes_oracle": paired,
            "methods": {},
            "timings_seconds": {"train": train_seconds, "type2_ml": type2_seconds,
                                "total": time.perf_counter() - t_start},
        }
        for name, curve in curves.items():
            entry = {"curve": curve, "expected_loss_at_convergence": expected_at[name]}
            base = {"Type-II ML (MAP)": "Type-II ML", "Oracle (MAP)": None}.get(name, name)
            if base is not None:
                entry["phi"], entry["sigma"] = learned[base]
                entry["phi_error"] = float(np.max(np.abs(np.asarray(learned[base][0]) - domain.phi)))
            if name in histories:
                h = histories[name]
                entry["training"] = {"every": every, "sigma": h["sigma"][::every],
                                     "val_log_lik": h["val_log_lik"][::every],
                                     "num_skipped": int(states[name].num_skipped),
                                     "max_cg_iterations": int(h["cg_iterations"].max()),
                                     "max_cg_residual": float(h["cg_residual"].max())}
            if name == "Type-II ML (MAP)":
                entry["type2_ml"] = {"log_marginal": type2.log_marginal, "iterations": type2.num_iterations,
                                     "grad_norm": type2.grad_norm, "converged": type2.converged}
            payload["methods"][name] = entry
        path = write_json(out / "linear_toy.json", payload)
        print(f"wrote {path}")
    with phase("plotting"):
        if not args.no_plot:
            print(f"wrote {plot(out / 'linear_toy.png', curves, references, learned, domain)}")
    return payload


def sigma_verdict(quick: bool, meta_steps: int, learner_names, shared_eq4: float, shared_opt: float) -> str:
    """What to read the learned sigmas against: the exact targets, unless the run is too short."""
    if quick:
        return (f"--quick: a smoke run of {meta_steps} meta-steps. The meta-learned sigmas ({', '.join(learner_names)}) "
                "have NOT converged (the recorded run takes 3000 steps to reach the truth): they are not estimates "
                "to compare with the exact targets.")
    text = (f"Exact targets: Eq. 4's fixed point is the true sigma for M-Shrinkage, and {shared_eq4:.2f} for "
            f"Shrinkage's one sigma\n(whose PLL optimum is {shared_opt:.2f}: Eq. 4 drops the likelihood Hessian).")
    if meta_steps < 3000:
        text += f"\n({meta_steps} meta-steps, fewer than the recorded run's 3000: the sigmas may not have converged.)"
    return text


def plot(path, curves, references, learned, domain):
    plt = pyplot()

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 5.5))
    oracle, mle = references["oracle"], references["mle"]
    realised = f"Bayes oracle on these held-out tasks ({oracle['held_out']:.3f} +- {oracle['held_out_sem']:.3f})"
    expected = f"Bayes oracle E[loss], closed form ({oracle['expected']:.3f})"

    def references_on(ax):
        ax.axhspan(oracle["held_out"] - oracle["held_out_sem"], oracle["held_out"] + oracle["held_out_sem"],
                   color="0.5", alpha=0.2, linewidth=0)
        ax.axhline(oracle["held_out"], color="k", linestyle="-", linewidth=0.8, label=realised)
        ax.axhline(oracle["expected"], color="k", linestyle="--", linewidth=1, label=expected)
        ax.axhline(mle["expected"], color="0.3", linestyle="-.", linewidth=1, label=f"MLE E[loss], closed form ({mle['expected']:.3f})")

    plot_loss_curves(ax0, curves)
    references_on(ax0)
    ax0.set_ylim(oracle["expected"] - 0.3, mle["expected"] + 0.9)
    ax0.set_title("Linear domain: held-out loss (band: mean +- sem)")
    ax0.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    # the methods that reach the oracle coincide: zoom on the second half of the steps, lines only
    last = int(max(c.steps[-1] for c in curves.values()))
    zoom = ax0.inset_axes([0.38, 0.45, 0.59, 0.52])
    plot_loss_curves(zoom, curves, band=None)
    references_on(zoom)
    zoom.get_legend().remove()
    low = min([c.mean[-1] for c in curves.values()] + [oracle["held_out"], oracle["expected"]])
    zoom.set_xlim(last // 2, last)
    zoom.set_ylim(low - 0.05, low + 0.35)
    zoom.set_xlabel("")
    zoom.set_ylabel("")
    zoom.tick_params(labelsize=7)
    zoom.text(0.02, 0.96, f"zoom: steps {last // 2}-{last}, no bands", transform=zoom.transAxes, fontsize=7, va="top")
    ax0.indicate_inset_zoom(zoom, edgecolor="0.4")
    modules = np.arange(1, domain.num_params + 1)
    ax1.plot(modules, domain.sigma, "k_", markersize=25, mew=2, label="truth")
    for i, (name, (_, sigma)) in enumerate(learned.items()):
        ax1.plot(modules + 0.12 * (i - 1), np.broadcast_to(sigma, modules.shape), "o", label=name)
    ax1.set_xlabel("module (coordinate)")
    ax1.set_ylabel("sigma")
    ax1.set_title("Learned shrinkage per module")
    ax1.legend(fontsize=8)
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
