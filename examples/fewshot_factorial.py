"""Why M-Shrinkage fails on few-shot tasks: the phi step and the sigma step swapped one at a time.

Issue 23's controlled experiment as a reproducible study: the same network, data, initialisation,
episodes, optimisers and inner solve (L-BFGS in the prior's scale) for every cell; only the
phi step and the sigma step of :func:`hiermeta.learners.gaussian_prior_learner` change:

    phi step   map      Algorithm 1: along mean_t (theta_hat_t - phi) / sigma^2 (sees only the support)
               reptile  along mean_t (theta_hat_t - phi)
               pll      the predictive likelihood's hypergradient (CG)       (iMAML's step)
    sigma step eq4      the paper's Eq. 4
               exact    the PLL hypergradient by CG
               fixed    held at --fixed-sigma (iMAML's 0.32 for 5-way 1-shot)

(map, eq4) is M-Shrinkage, (pll, exact) M-sigma-iMAML, (pll, fixed) iMAML.  "Untrained" adapts
from the random initialisation at the fixed sigma.  Every cell runs for every seed (a seed fixes
the initialisation, the training episodes and the test episodes), so cells are compared paired
by seed.  Reported per cell: test accuracy (mean over seeds, 95% t-interval over seeds, and each
seed's accuracy with its interval over test episodes), the learned sigma per layer, the sigma
step's residual (Eq. 4's ``||H Sigma g - g|| / ||g||``), the run-off check; and learned minus
fixed sigma per phi step, paired by seed.

The default run is sized for 2 shared CPU cores: 16 x 16 glyphs, 8 filters, 2 blocks, 10 L-BFGS
iterations, 60 meta-steps of 4 episodes, 200 test episodes (the issue's run: 20 x 20, 32 filters,
4 blocks, 20 iterations, 100 meta-steps, 300 episodes).

    python examples/fewshot_factorial.py --seeds 0 1 2 --out docs/benchmarks
    python examples/fewshot_factorial.py --quick
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import hiermeta as hm  # noqa: E402
from hiermeta.implicit import cg_solve  # noqa: E402
from hiermeta.learners import check_run_off, gaussian_prior_learner, phi_sigma_optimizer, sigma_of  # noqa: E402
from hiermeta.models import fewshot, glyphs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import count, format_table, positive_float, prng_seed, study_parser, write_json  # noqa: E402
from _fewshot_study import paired_difference, seed_interval  # noqa: E402

PHI_STEPS = ("map", "reptile", "pll")
SIGMA_STEPS = ("eq4", "exact", "fixed")
NAMES = {("map", "eq4"): "M-Shrinkage", ("pll", "exact"): "M-sigma-iMAML", ("pll", "fixed"): "iMAML"}


def build_parser():
    p = study_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny network, few steps and episodes")
    p.add_argument("--out", default="results", help="output directory for fewshot_factorial.json")
    p.add_argument("--seeds", type=prng_seed, nargs="+", default=[0, 1, 2], help="seeds (initialisation and episodes)")
    p.add_argument("--phi-steps", nargs="+", choices=PHI_STEPS, default=["map", "pll"], help="phi steps to cross")
    p.add_argument("--sigma-steps", nargs="+", choices=SIGMA_STEPS, default=list(SIGMA_STEPS), help="sigma steps")
    p.add_argument("--ways", type=count(2), default=5, help="classes per episode")
    p.add_argument("--shots", type=count(1), default=1, help="support images per class")
    p.add_argument("--queries", type=count(1), default=5, help="query images per class")
    p.add_argument("--image-size", type=count(8), help="image side (default 16, quick 12)")
    p.add_argument("--filters", type=count(1), help="conv filters per block (default 8, quick 4)")
    p.add_argument("--blocks", type=count(1), default=2, help="conv blocks")
    p.add_argument("--meta-steps", type=count(1), help="meta-steps per cell (default 60, quick 4)")
    p.add_argument("--batch-size", type=count(1), default=4, help="episodes per meta-step")
    p.add_argument("--solver-steps", type=count(1), help="L-BFGS iterations per task (default 10, quick 3)")
    p.add_argument("--cg-iterations", type=count(1), default=5, help="CG iterations of the exact hypergradients")
    p.add_argument("--outer-lr", type=positive_float, default=3e-3, help="Adam rate on phi")
    p.add_argument("--sigma-lr", type=positive_float, default=0.03, help="Adam rate on log sigma^2")
    p.add_argument("--fixed-sigma", type=positive_float,
                   help="the fixed sigma and the learned sigmas' start (default 1 / sqrt(2 ways shots): iMAML's)")
    p.add_argument("--test-episodes", type=count(2), help="test episodes per cell and seed (default 200, quick 10)")
    p.add_argument("--augment", action="store_true", help="random affine augmentation of every episode's images")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    q = args.quick
    args.image_size = args.image_size or (12 if q else 16)
    args.filters = args.filters or (4 if q else 8)
    args.meta_steps = args.meta_steps or (4 if q else 60)
    args.solver_steps = args.solver_steps or (3 if q else 10)
    args.test_episodes = args.test_episodes or (10 if q else 200)
    args.fixed_sigma = args.fixed_sigma or (2.0 * args.ways * args.shots) ** -0.5
    return args


def make_learner(phi_step, sigma_step, args, model):
    cg = cg_solve(maxiter=args.cg_iterations, tol=1e-6)
    solver = hm.solvers.prior_scaled(hm.solvers.lbfgs(args.solver_steps, tol=1e-2, linesearch_steps=4))
    learned = sigma_step != "fixed"
    return gaussian_prior_learner(
        model, phi_step=phi_step, sigma_step=cg if sigma_step == "exact" else sigma_step,
        phi_hypergradient=cg if phi_step == "pll" else None, modular=True, inner_solver=solver,
        init_sigma=args.fixed_sigma if learned else None, fixed_sigma=None if learned else args.fixed_sigma,
        outer_optimizer=phi_sigma_optimizer(optax.adam(args.outer_lr), optax.adam(args.sigma_lr)),
        name=f"phi {phi_step} / sigma {sigma_step}")


def payload(args, modules, runs, t_start) -> dict:
    """The study's JSON: every run, and per cell the mean over the seeds run so far with its
    t-interval, the learned sigma and the sigma step's residual; learned minus fixed, paired by seed."""
    runs = {cell: entries for cell, entries in runs.items() if entries}
    summary = {}
    for cell, entries in runs.items():
        acc = [e["scores"]["accuracy"] for e in entries]
        mean, half = seed_interval(acc)
        summary[cell] = {"accuracy": mean, "accuracy_ci95_over_seeds": half, "per_seed": acc,
                         "per_seed_ci95_over_episodes": [e["scores"]["accuracy_ci95"] for e in entries]}
        if "sigma" in entries[0]:
            summary[cell]["sigma_mean_over_seeds"] = np.mean([e["sigma"] for e in entries], axis=0)
            summary[cell]["sigma_residual_median"] = float(np.median([e["sigma_residual_last"] for e in entries]))
            summary[cell]["seeds_run_off"] = int(sum(any(e["run_off"]["ran_off"]) for e in entries))
    contrasts = {}
    for phi_step in args.phi_steps:
        fixed = runs.get(f"{phi_step} / fixed")
        for sigma_step in ("eq4", "exact"):
            learned = runs.get(f"{phi_step} / {sigma_step}")
            if fixed and learned:
                d, h = paired_difference([e["scores"]["accuracy"] for e in learned],
                                         [e["scores"]["accuracy"] for e in fixed])
                contrasts[f"{phi_step}: {sigma_step} - fixed"] = {"difference": d, "ci95_over_seeds": h}
    return {"schema": "hiermeta/fewshot_factorial/v1", "data": "rendered glyphs (stand-in, not Omniglot)",
            "config": vars(args), "modules": modules, "jax_version": jax.__version__, "runs": runs,
            "summary": summary, "learned_minus_fixed": contrasts, "seconds": time.perf_counter() - t_start}


def print_report(out, args) -> None:
    """The tables: accuracy per cell, learned minus fixed, sigma per layer."""
    modules = out["modules"]
    summary, contrasts = out["summary"], out["learned_minus_fixed"]
    rows = []
    for cell, v in summary.items():
        phi_step, sigma_step = cell.split(" / ")
        rows.append([phi_step, sigma_step, NAMES.get((phi_step, sigma_step), ""),
                     f"{100 * v['accuracy']:.1f} +- {100 * v['accuracy_ci95_over_seeds']:.1f}",
                     " ".join(f"{100 * a:.1f}" for a in v["per_seed"]),
                     f"{v['sigma_residual_median']:.3g}" if "sigma_residual_median" in v else "-",
                     f"{v['seeds_run_off']}/{len(args.seeds)}" if "seeds_run_off" in v else "-"])
    print(f"\n{args.ways}-way {args.shots}-shot test accuracy %, mean over {len(args.seeds)} seeds (95% t-interval over "
          f"seeds; {args.test_episodes} test episodes per seed)")
    print(format_table(["phi step", "sigma step", "preset", "accuracy %", "per seed", "sigma residual", "run off"], rows))
    print("\nLearned minus fixed sigma, paired by seed (accuracy points, 95% t-interval)")
    print(format_table(["contrast", "difference"],
                       [[k, f"{100 * v['difference']:+.1f} +- {100 * v['ci95_over_seeds']:.1f}"] for k, v in contrasts.items()]))
    sig = [[c, *v["sigma_mean_over_seeds"]] for c, v in summary.items() if "sigma_mean_over_seeds" in v]
    if sig:
        print("\nLearned sigma per layer (mean over seeds)")
        print(format_table(["cell", *modules], sig, digits=4))


def main(argv=None):
    args = parse_args(argv)
    hm.enable_compilation_cache()
    t_start = time.perf_counter()
    dataset = glyphs.glyph_dataset(image_size=args.image_size)
    splits = glyphs.default_splits(dataset)
    augment = fewshot.Augmentation() if args.augment else None
    spec = dict(ways=args.ways, shots=args.shots, queries=args.queries, augment=augment)
    cells = list(itertools.product(args.phi_steps, args.sigma_steps)) + [("untrained", "fixed")]
    runs = {f"{p} / {s}": [] for p, s in cells}
    modules = None
    for seed in args.seeds:
        net = fewshot.convnet(args.ways, args.image_size, filters=args.filters, blocks=args.blocks)
        k_init, k_train, k_test = jax.random.split(jax.random.PRNGKey(seed), 3)
        params = net.init(k_init)
        model = fewshot.make_model(net, params)
        modules = list(model.partition.names)
        sample = fewshot.episode_sampler(dataset.images, splits["train"], num_tasks=args.batch_size, **spec)
        test = fewshot.episode_sampler(dataset.images, splits["test"], num_tasks=min(50, args.test_episodes), **spec)
        for phi_step, sigma_step in cells:
            t0 = time.perf_counter()
            learner = make_learner("pll" if phi_step == "untrained" else phi_step, sigma_step, args, model)
            state = learner.init(k_init, params)
            history = None
            if phi_step != "untrained":
                state, history = hm.fit(learner, state, sample, args.meta_steps, data_key=k_train, progress=False)
            scores = fewshot.evaluate_episodes(learner, state, test, args.test_episodes, key=k_test,
                                               num_steps=args.solver_steps)
            entry = {"seed": seed, "scores": scores.to_dict(), "num_skipped": int(state.num_skipped),
                     "seconds": time.perf_counter() - t0}
            if history is not None and sigma_step != "fixed":
                entry["sigma"] = np.asarray(sigma_of(state.params, model.partition.num_modules))
                entry["sigma_residual_last"] = float(np.median(history["sigma_residual"][-10:]))
                entry["run_off"] = check_run_off(history, names=modules, who=learner.name, warn=False).to_dict()
            runs[f"{phi_step} / {sigma_step}"].append(entry)
            print(f"  seed {seed} phi {phi_step:9s} sigma {sigma_step:6s} accuracy {100 * scores.accuracy:5.1f} +- "
                  f"{100 * scores.accuracy_ci95:.1f}%  ({entry['seconds']:.0f} s)", flush=True)
        path = write_json(Path(args.out) / "fewshot_factorial.json", payload(args, modules, runs, t_start))
        print(f"  (seed {seed} done: {path})", flush=True)
    out = payload(args, modules, runs, t_start)
    print_report(out, args)
    path = write_json(Path(args.out) / "fewshot_factorial.json", out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
