"""Experiment 2 of Chen et al. (the non-linear swirl domain): Shrinkage and M-Shrinkage against the
Bayes oracle.

Meta-trains Shrinkage (one sigma) and M-Shrinkage (one sigma per coordinate) on fresh swirl tasks,
then adapts them to held-out tasks for 0..1000 steps and prints the generalisation loss beside
Monte-Carlo references on the same tasks: the Bayes oracle (the global MAP under the true prior),
the MAP that descent from the true phi reaches, the posterior mean of mu (the Bayes-optimal
prediction) and the MLE (closed form; expected loss 6).  "Oracle (MAP)" is the methods' own inner
loop at the true phi and sigma.

    python examples/nonlinear_toy.py            # a few minutes on 2 CPU cores
    python examples/nonlinear_toy.py --quick    # smoke run
    python examples/nonlinear_toy.py --out DIR  # nonlinear_toy.json and nonlinear_toy.png in DIR (default results/)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import hiermeta as hm  # noqa: E402
from hiermeta.learners import shrinkage_params, sigma_of  # noqa: E402
from hiermeta.models import swirl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py, also when loaded from elsewhere
from _common import count, format_table, plot_loss_curves, positive_float, prng_seed, pyplot, save_figure, study_parser, write_json  # noqa: E402

REPORT_STEPS = (0, 10, 100, 300, 1000)
REF_NAMES = {"oracle_map": "Bayes oracle (global MAP)", "local_map": "MAP from phi (true prior)",
             "posterior_mean": "posterior mean of mu", "mle": "MLE"}


def build_parser():
    p = study_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="short smoke run")
    p.add_argument("--out", default="results", help="output directory for nonlinear_toy.json and nonlinear_toy.png")
    p.add_argument("--seed", type=prng_seed, default=0, help="seed of the task streams, the held-out tasks and the initial state")
    p.add_argument("--meta-steps", type=count(1), help="meta-iterations per learner (default 2000, quick 50)")
    p.add_argument("--batch-size", type=count(1), default=25, help="tasks per meta-iteration")
    p.add_argument("--inner-steps", type=count(1), help="K, inner SGD steps while meta-training (default 500, quick 50)")
    p.add_argument("--inner-lr", type=positive_float, default=0.1, help="inner SGD learning rate")
    p.add_argument("--outer-lr", type=positive_float, default=0.03, help="initial Adam learning rate (cosine-decayed)")
    p.add_argument("--test-tasks", type=count(2), help="held-out tasks (default 1000, quick 100)")
    p.add_argument("--test-steps", type=count(1), help="adaptation steps evaluated (default 1000, quick 100)")
    p.add_argument("--no-plot", action="store_true", help="write no figure")
    return p


def parse_args(argv=None):
    p = build_parser()
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    hm.enable_compilation_cache()
    pick = lambda value, quick, full: value if value is not None else (quick if args.quick else full)
    meta_steps = pick(args.meta_steps, 50, 2000)
    inner_steps = pick(args.inner_steps, 50, 500)
    test_tasks = pick(args.test_tasks, 100, 1000)
    test_steps = pick(args.test_steps, 100, 1000)
    out = Path(args.out)
    t_start = time.perf_counter()

    domain = swirl.paper_domain()
    model = swirl.make_model(domain)  # every coordinate its own module
    key_train, key_test, key_init = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    sample_batch = lambda key: swirl.sample_tasks(domain, key, args.batch_size)[1]
    schedule = optax.cosine_decay_schedule(args.outer_lr, meta_steps, alpha=0.1)
    config = dict(inner_optimizer=optax.sgd(args.inner_lr), inner_steps=inner_steps,
                  outer_optimizer=optax.adam(schedule), init_sigma=1.0)
    learners = {"Shrinkage": hm.shrinkage(model, modular=False, **config), "M-Shrinkage": hm.m_shrinkage(model, **config)}

    # ---------------------------------------------------------------- meta-training
    states, histories, train_seconds = {}, {}, {}
    for name, learner in learners.items():
        t0 = time.perf_counter()
        state = learner.init(key_init, jnp.zeros(domain.num_params))
        state, history = hm.fit(learner, state, sample_batch, meta_steps, data_key=key_train, description=name)
        train_seconds[name] = time.perf_counter() - t0
        states[name], histories[name] = state, history
        print(f"[{time.perf_counter() - t_start:6.1f}s] meta-trained {name}: {meta_steps} steps "
              f"in {train_seconds[name]:.1f}s ({int(state.num_skipped)} skipped)", flush=True)

    # ---------------------------------------------------------------- held-out evaluation and references
    _, test = swirl.sample_tasks(domain, key_test, test_tasks)
    curves = {name: hm.evaluate(learner, states[name], test, test_steps) for name, learner in learners.items()}
    oracle_state = states["M-Shrinkage"]._replace(params=shrinkage_params(model, domain.phi, domain.sigma))
    curves["Oracle (MAP)"] = hm.evaluate(learners["M-Shrinkage"], oracle_state, test, test_steps)
    print(f"[{time.perf_counter() - t_start:6.1f}s] evaluated {len(curves)} methods on {test_tasks} held-out tasks, "
          f"0..{test_steps} steps", flush=True)
    t0 = time.perf_counter()
    per_task = swirl.reference_losses(model, domain, test)
    sem = lambda x: float(np.std(x, ddof=1) / np.sqrt(len(x)))
    references = {REF_NAMES[k]: {"held_out": float(per_task[k].mean()), "held_out_sem": sem(per_task[k])}
                  for k in REF_NAMES}
    references["MLE"]["expected"] = swirl.mle_expected_loss(domain)
    references["Bayes oracle (global MAP)"]["max_grad_norm"] = per_task["oracle_grad_norm"]
    print(f"[{time.perf_counter() - t_start:6.1f}s] Monte-Carlo references on the held-out tasks "
          f"({time.perf_counter() - t0:.1f}s; oracle max |grad L| {per_task['oracle_grad_norm']:.1e})", flush=True)

    # ---------------------------------------------------------------- report
    M = model.partition.num_modules
    learned = {name: (np.asarray(states[name].params["phi"]), np.asarray(sigma_of(states[name].params, M)))
               for name in learners}
    steps = [s for s in REPORT_STEPS if s <= test_steps]
    last = test_steps
    print("\nLearned sigma per module (truth first); phi error = max_m |phi_m - 2|")
    rows = [["truth", *domain.sigma, 0.0]]
    rows += [[name, *sigma, np.max(np.abs(phi - domain.phi))] for name, (phi, sigma) in learned.items()]
    print(format_table(["method", *[f"s{m + 1}" for m in range(M)], "phi err"], rows, 2))

    print(f"\nGeneralisation loss on {test_tasks} held-out tasks (mean over tasks; +- is the SEM at step {last})")
    loss_rows = [[name, *[c.at(s) for s in steps], f"+-{c.sem[last]:.3f}", int(np.argmin(c.mean)), float(c.mean.min())]
                 for name, c in curves.items()]
    for label, r in references.items():
        loss_rows.append([label, *["" for _ in steps[:-1]], r["held_out"], f"+-{r['held_out_sem']:.3f}", "", ""])
    print(format_table(["method", *[f"k={s}" for s in steps], "sem", "best step", "best"], loss_rows))
    gaps = {}
    for name in curves:
        for ref in ("oracle_map", "local_map"):
            gap = curves[name].per_task[:, last] - per_task[ref]
            gaps[f"{name} - {REF_NAMES[ref]}"] = {"mean": float(gap.mean()), "sem": sem(gap)}
    print(f"\nPaired differences at step {last} over the same tasks:")
    for label, g in gaps.items():
        print(f"  {label:55s} {g['mean']:+.4f} +- {g['sem']:.4f}")
    offsets = per_task["map_phi_offset"]
    print("\nAlgorithm 1's phi step at the true (phi, sigma), mean over the held-out tasks of theta_hat - phi "
          "(zero if the true phi were its fixed point):")
    print(format_table(["MAP", *[f"d{m + 1}" for m in range(M)]],
                       [[REF_NAMES[k], *v] for k, v in offsets.items()], 2))
    print(f"total {time.perf_counter() - t_start:.1f}s")

    # ---------------------------------------------------------------- JSON + figure
    every = max(1, meta_steps // 200)
    payload = {
        "schema": "hiermeta/nonlinear_toy/v1",
        "config": {**vars(args), "meta_steps": meta_steps, "inner_steps": inner_steps, "test_tasks": test_tasks,
                   "test_steps": test_steps, "outer_schedule": "adam, cosine decay to 0.1x", "init_sigma": 1.0,
                   "modules": list(model.partition.names), "jax_version": jax.__version__},
        "truth": {"phi": domain.phi, "sigma": domain.sigma, "noise_sd": domain.noise_sd, "omega": domain.omega,
                  "n_train": domain.n_train, "n_val": domain.n_val},
        "references": references,
        "paired_gaps_last_step": gaps,
        "map_phi_offset_at_truth": per_task["map_phi_offset"],
        "methods": {},
        "timings_seconds": {"train": train_seconds, "total": time.perf_counter() - t_start},
    }
    for name, curve in curves.items():
        entry = {"curve": curve}
        if name in learned:
            entry["phi"], entry["sigma"] = learned[name]
            h = histories[name]
            entry["training"] = {"every": every, "sigma": h["sigma"][::every], "val_log_lik": h["val_log_lik"][::every],
                                 "num_skipped": int(states[name].num_skipped)}
        payload["methods"][name] = entry
    path = write_json(out / "nonlinear_toy.json", payload)
    print(f"wrote {path}")
    if not args.no_plot:
        print(f"wrote {plot(out / 'nonlinear_toy.png', curves, references, learned, domain)}")
    return payload


def plot(path, curves, references, learned, domain):
    plt = pyplot()

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
    plot_loss_curves(ax0, curves)
    for (ref, value), style in zip(references.items(), ["--", ":", "-.", (0, (1, 4))]):
        ax0.axhline(value["held_out"], color="k", linestyle=style, linewidth=1, label=ref)
    ax0.legend(fontsize=8)
    ax0.set_xscale("symlog", linthresh=10)
    ax0.set_xlim(0, max(c.steps[-1] for c in curves.values()))
    ax0.set_ylim(references["posterior mean of mu"]["held_out"] - 0.2, references["MLE"]["held_out"] + 0.8)
    ax0.set_title("Swirl domain: held-out loss (band: 68% CI of the mean)")
    modules = np.arange(1, domain.num_params + 1)
    ax1.plot(modules, domain.sigma, "k_", markersize=25, mew=2, label="truth")
    for i, (name, (_, sigma)) in enumerate(learned.items()):
        ax1.plot(modules + 0.12 * (i - 0.5), np.broadcast_to(sigma, modules.shape), "o", label=name)
    ax1.set_xlabel("module (coordinate)")
    ax1.set_ylabel("sigma")
    ax1.set_title("Learned shrinkage per module")
    ax1.legend(fontsize=8)
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
