"""Few-shot classification: which layers of a convnet should adapt to a new task?

Meta-trains the 4-block convnet (``hiermeta.models.fewshot``) on k-way n-shot episodes of the rendered
glyph set (``hiermeta.models.glyphs``: an Omniglot-like stand-in, NOT Omniglot; ``--omniglot ROOT`` uses the
real data if you have it) with M-Shrinkage and M-sigma-iMAML (one sigma per layer), MAML,
FOMAML, Reptile, iMAML and ProtoNet, then scores each on at least 600 test episodes of classes
(and alphabets) never seen in meta-training: query accuracy and cross-entropy with 95%
confidence intervals, the learned sigma per layer (which layers shrinkage shares across tasks
and which it frees) and the time per meta-step.  "Untrained" is the sigma learners' adaptation
from the network's random initialisation: what meta-training adds.  The Gaussian-prior learners
solve each task's MAP by L-BFGS in the prior's scale (``hm.solvers.prior_scaled``; a fixed-rate
inner loop is unstable for every layer whose sigma exceeds a limit and drags the sigmas down to it).

The default run is sized for 2 CPU cores: 20 x 20 images and 32 filters instead of 28 x 28 and
64 (``--image-size 28 --filters 64`` is the standard network), and 200 meta-steps per learner
(published Omniglot runs take tens of thousands).  It still takes hours there: the L-BFGS
learners took 1.4-1.6 s per 5-way 1-shot meta-step and about 9 s per 5-shot one on 2 shared cores.

    python examples/fewshot.py                       # 5-way 1-shot and 5-shot
    python examples/fewshot.py --quick               # smoke run (< 2 minutes with a warm cache)
    python examples/fewshot.py --ways 20 --shots 1   # 20-way
    python examples/fewshot.py --checkpoint-dir ckpt [--resume | --overwrite]   # checkpoints per learner and setting
    python examples/fewshot.py --out DIR             # fewshot.json and fewshot.png in DIR (default results/)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import hiermeta as hm  # noqa: E402
from hiermeta.checkpoint import read_metadata  # noqa: E402
from hiermeta.implicit import cg_solve  # noqa: E402
from hiermeta.learners import rates_of, sigma_of  # noqa: E402
from hiermeta.learners.bilevel import proximal_sgd  # noqa: E402
from hiermeta.models import fewshot, glyphs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py, also when loaded from elsewhere
from _common import count, format_table, positive_float, prng_seed, pyplot, save_figure, study_parser, write_json  # noqa: E402
from _fewshot_study import layer_movement  # noqa: E402

LEARNERS = ("M-Shrinkage", "M-sigma-iMAML", "MAML", "FOMAML", "Reptile", "iMAML", "ProtoNet", "Untrained")
SIGMA_LEARNERS = ("M-Shrinkage", "M-sigma-iMAML")
GAUSSIAN_PRIOR_LEARNERS = ("M-Shrinkage", "M-sigma-iMAML", "iMAML", "Untrained")


def build_parser():
    p = study_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny network, few steps and episodes")
    p.add_argument("--out", default="results", help="output directory for fewshot.json and fewshot.png")
    p.add_argument("--seed", type=prng_seed, default=0, help="seed of initialisation and episodes")
    p.add_argument("--ways", type=count(2), nargs="+", default=[5], help="classes per episode")
    p.add_argument("--shots", type=count(1), nargs="+", default=[1, 5], help="support images per class")
    p.add_argument("--queries", type=count(1), default=5, help="query images per class")
    p.add_argument("--learners", nargs="+", choices=LEARNERS,
                   help="learners to run (default all; Untrained: the sigma learners' adaptation from the "
                        "network's random initialisation, without meta-training)")
    p.add_argument("--image-size", type=count(8), help="image side in pixels (default 20, quick 16)")
    p.add_argument("--filters", type=count(1), help="conv filters per block (default 32, quick 8)")
    p.add_argument("--blocks", type=count(1), help="conv blocks (default 4, quick 2: less to compile)")
    p.add_argument("--meta-steps", type=count(1), help="meta-steps per learner and setting (default 200, quick 20)")
    p.add_argument("--batch-size", type=count(1), help="episodes per meta-step (default 8, quick 4)")
    p.add_argument("--inner-steps", type=count(1), default=3, help="K, adaptation steps while meta-training")
    p.add_argument("--inner-solver", choices=("lbfgs", "proximal"), default="lbfgs",
                   help="inner solver of the Gaussian-prior learners (M-Shrinkage, M-sigma-iMAML, iMAML): "
                        "L-BFGS in the prior's scale (--solver-steps iterations, in training and test), or "
                        "K proximal gradient steps (--inner-steps, --test-steps)")
    p.add_argument("--solver-steps", type=count(1), help="L-BFGS iterations per task (default 20, quick 5)")
    p.add_argument("--test-steps", type=count(1), default=10, help="adaptation steps on test episodes")
    p.add_argument("--inner-lr", type=positive_float,
                   help="fixed inner rate on the MEAN support cross-entropy (the rate on the summed "
                        "log-likelihood is this / (ways * shots)); default: 1 / the likelihood's largest "
                        "curvature per task for the proximal inner solver (--inner-solver proximal), "
                        "and MAML's Omniglot value 0.4 for MAML, FOMAML and Reptile")
    p.add_argument("--outer-lr", type=positive_float, default=3e-3, help="Adam rate on the network's phi")
    p.add_argument("--sigma-lr", type=positive_float, default=0.03, help="Adam rate on log sigma^2")
    p.add_argument("--init-sigma", type=positive_float,
                   help="initial sigma of every layer of the sigma learners (default: iMAML's fixed sigma, "
                        "1 / sqrt(lambda * ways * shots): 0.32 for 5-way 1-shot, 0.14 for 5-shot)")
    p.add_argument("--imaml-lambda", type=positive_float, default=2.0,
                   help="iMAML's lambda on the MEAN support cross-entropy (Rajeswaran et al.'s value)")
    p.add_argument("--cg-iterations", type=count(1), default=5, help="CG iterations of the exact hypergradients")
    p.add_argument("--test-episodes", type=count(2), help="test episodes per learner and setting (default 600, quick 40)")
    p.add_argument("--omniglot", help="Omniglot root (images_background/, images_evaluation/) instead of the glyph set")
    p.add_argument("--checkpoint-dir", help="directory for one checkpoint per learner and setting")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --checkpoint-dir")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoints in --checkpoint-dir (else an "
                   "existing one is refused)")
    p.add_argument("--devices", type=count(1), help="split each batch of episodes over this many devices")
    p.add_argument("--no-plot", action="store_true", help="skip the figure")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if (args.resume or args.overwrite) and not args.checkpoint_dir:
        p.error("--resume and --overwrite need --checkpoint-dir")
    if args.resume and args.overwrite:
        p.error("--resume continues the checkpoints and --overwrite replaces them: give one of them")
    held = sorted(Path(args.checkpoint_dir).glob("*.npz")) if args.checkpoint_dir else []
    if held and not (args.resume or args.overwrite):
        p.error(f"--checkpoint-dir {args.checkpoint_dir} already holds checkpoints ({', '.join(h.name for h in held[:3])}"
                f"{', ...' if len(held) > 3 else ''}): add --resume to continue them or --overwrite to replace them")
    args.learners = args.learners or list(LEARNERS)
    args.image_size = args.image_size or (16 if args.quick else 20)
    args.filters = args.filters or (8 if args.quick else 32)
    args.blocks = args.blocks or (2 if args.quick else 4)
    args.meta_steps = args.meta_steps or (20 if args.quick else 200)
    args.batch_size = args.batch_size or (4 if args.quick else 8)
    args.solver_steps = args.solver_steps or (5 if args.quick else 20)
    args.test_episodes = args.test_episodes or (40 if args.quick else 600)
    return args


def load_data(args):
    if args.omniglot:
        from hiermeta.models import omniglot

        dataset = omniglot.load_omniglot(args.omniglot, image_size=args.image_size)
        return dataset, omniglot.background_evaluation_split(dataset), "Omniglot"
    dataset = glyphs.glyph_dataset(image_size=args.image_size)
    return dataset, glyphs.default_splits(dataset), "rendered glyphs (stand-in, not Omniglot)"


def make_learners(args, model, net, ways, shots):
    """The learners (and the Untrained baseline) on one setting; rates on the summed log-likelihood of the support."""
    n_support = ways * shots
    rate = (0.4 if args.inner_lr is None else args.inner_lr) / n_support
    K = args.inner_steps
    init_sigma = args.init_sigma or (args.imaml_lambda * n_support) ** -0.5  # where iMAML's prior sits
    proximal = proximal_sgd(None if args.inner_lr is None else rate)
    if args.inner_solver == "lbfgs":
        gp = dict(inner_solver=hm.solvers.prior_scaled(hm.solvers.lbfgs(args.solver_steps, tol=1e-2, linesearch_steps=4)))
    else:
        gp = dict(inner_optimizer=proximal, inner_steps=K)
    phi_opt = optax.adam(args.outer_lr)
    both = optax.multi_transform({"phi": optax.adam(args.outer_lr), "log_sigma2": optax.adam(args.sigma_lr)},
                                 {"phi": "phi", "log_sigma2": "log_sigma2"})
    cg = cg_solve(maxiter=args.cg_iterations, tol=1e-6)
    factories = {
        "M-Shrinkage": lambda: hm.m_shrinkage(model, **gp,
                                              outer_optimizer=both, init_sigma=init_sigma),
        "M-sigma-iMAML": lambda: hm.m_sigma_imaml(model, **gp,
                                                  outer_optimizer=both, init_sigma=init_sigma, hypergradient=cg),
        "MAML": lambda: hm.maml(model, inner_steps=K, init_lr=rate, outer_optimizer=phi_opt),
        "FOMAML": lambda: hm.fomaml(model, inner_steps=K, init_lr=rate, outer_optimizer=phi_opt),
        "Reptile": lambda: hm.reptile(model, inner_optimizer=optax.sgd(rate), inner_steps=K,
                                      outer_optimizer=optax.sgd(1.0)),
        "iMAML": lambda: hm.imaml(model, lam=args.imaml_lambda * n_support, **gp,
                                  outer_optimizer=phi_opt, hypergradient=cg),
        "ProtoNet": lambda: hm.protonet(model, embed=net.embed, outer_optimizer=phi_opt),
        # the sigma learners' adaptation from the network's random initialisation at their initial sigma:
        # what any meta-training adds to it
        "Untrained": lambda: hm.m_sigma_imaml(model, **gp, init_sigma=init_sigma, name="Untrained"),
    }
    return {name: factories[name]() for name in args.learners}


def train(learner, state, sample, args, key, checkpoint, mesh):
    """Meta-train; the first step alone (it compiles), so the rest times the meta-steps themselves."""
    state, first = hm.fit(learner, state, sample, 1, data_key=key, progress=False, mesh=mesh)
    resumed_at = int(state.step)  # a resumed run times only the steps it takes
    if args.resume and checkpoint is not None and checkpoint.exists():
        resumed_at = int(read_metadata(checkpoint)["step"])
    t0 = time.perf_counter()
    state, history = hm.fit(learner, state, sample, args.meta_steps - 1, data_key=key, description=learner.name,
                            checkpoint=checkpoint, checkpoint_every=50 if checkpoint else None, resume=args.resume,
                            overwrite=args.overwrite, mesh=mesh)
    seconds, ran = time.perf_counter() - t0, int(state.step) - resumed_at
    history = {k: np.concatenate([first[k], history[k]]) if k in history else first[k] for k in first}
    return state, history, seconds / ran if ran > 0 else None


def run_setting(args, dataset, splits, ways, shots, mesh):
    net = fewshot.convnet(ways, args.image_size, filters=args.filters, blocks=args.blocks)
    k_init, k_train, k_test = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(args.seed), 100 * ways + shots), 3)
    params = net.init(k_init)
    model = fewshot.make_model(net, params)
    spec = dict(ways=ways, shots=shots, queries=args.queries)
    sample_train = fewshot.episode_sampler(dataset.images, splits["train"], num_tasks=args.batch_size, **spec)
    sample_test = fewshot.episode_sampler(dataset.images, splits["test"], num_tasks=min(50, args.test_episodes), **spec)
    results = {}
    for name, learner in make_learners(args, model, net, ways, shots).items():
        t0 = time.perf_counter()
        checkpoint = None
        if args.checkpoint_dir:
            checkpoint = Path(args.checkpoint_dir) / f"{ways}way{shots}shot-{name}.npz"
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
        state = learner.init(k_init, params)
        if name == "Untrained":
            history, step_seconds = {"val_log_lik": []}, None  # no meta-step
        else:
            state, history, step_seconds = train(learner, state, sample_train, args, k_train, checkpoint, mesh)
        steps = 0 if name == "ProtoNet" else args.test_steps
        if name in GAUSSIAN_PRIOR_LEARNERS and args.inner_solver == "lbfgs":
            steps = args.solver_steps
        scores = fewshot.evaluate_episodes(learner, state, sample_test, args.test_episodes, key=k_test, num_steps=steps)
        entry = {"scores": scores.to_dict(), "seconds_per_meta_step": step_seconds,
                 "num_skipped": int(state.num_skipped), "test_steps": steps,
                 "val_log_lik": history["val_log_lik"], "seconds": time.perf_counter() - t0}
        if name != "ProtoNet":
            entry["movement"] = layer_movement(learner, state, sample_test(k_test).train, steps, model.partition)
        if name in SIGMA_LEARNERS:
            entry["sigma"] = np.asarray(sigma_of(state.params, model.partition.num_modules))
            entry["sigma_history"] = history["sigma"]
            entry["max_cg_residual"] = float(np.max(history["cg_residual"]))
        if name in ("MAML", "FOMAML"):
            entry["inner_lr"] = float(rates_of(state.params, 1)[0])
        results[name] = entry
        timed = (f"{step_seconds * 1e3:7.1f} ms/meta-step" if step_seconds is not None
                 else "no meta-steps" if name == "Untrained" else "not timed (resumed)")
        print(f"  {name:14s} accuracy {scores.accuracy:.3f} +- {scores.accuracy_ci95:.3f}   {timed}   "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"modules": list(model.partition.names), "module_sizes": model.partition.module_sizes,
            "num_params": model.partition.num_params, "learners": results}


def plot(settings, path):
    plt = pyplot()
    names = list(next(iter(settings.values()))["learners"])
    fig, (ax_acc, ax_sigma) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(settings)
    for i, (label, setting) in enumerate(settings.items()):
        acc = [setting["learners"][n]["scores"]["accuracy"] for n in names]
        ci = [setting["learners"][n]["scores"]["accuracy_ci95"] for n in names]
        ax_acc.bar(np.arange(len(names)) + i * width, acc, width, yerr=ci, capsize=3, label=label)
        for j, name in enumerate(n for n in names if n in SIGMA_LEARNERS):
            entry = setting["learners"][name]
            ax_sigma.plot(setting["modules"], entry["sigma"], marker="os"[j % 2],
                          linestyle=["-", "--"][j % 2], label=f"{name}, {label}")
    ax_acc.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, ha="right")
    ax_acc.set_ylabel("test accuracy (95% CI)")
    ax_acc.legend(fontsize=8)
    ax_sigma.set_yscale("log")
    ax_sigma.set_xlabel("layer (module)")
    ax_sigma.set_ylabel("learned sigma (how far a task moves the layer)")
    ax_sigma.legend(fontsize=7)
    return save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    hm.enable_compilation_cache()
    t_start = time.perf_counter()
    dataset, splits, source = load_data(args)
    print(f"data: {source}: {dataset.num_classes} classes of {len(dataset.alphabets)} alphabets, "
          f"{dataset.instances} instances, {dataset.image_size}x{dataset.image_size}; classes per split "
          f"{ {k: int(v.size) for k, v in splits.items()} }")
    mesh = hm.sharding.task_mesh(num_devices=args.devices) if args.devices else None
    settings = {}
    for ways in args.ways:
        for shots in args.shots:
            label = f"{ways}-way {shots}-shot"
            print(f"\n{label}: {args.meta_steps} meta-steps of {args.batch_size} episodes, "
                  f"{args.test_episodes} test episodes", flush=True)
            settings[label] = run_setting(args, dataset, splits, ways, shots, mesh)

    rows = []
    for label, setting in settings.items():
        for name, entry in setting["learners"].items():
            s = entry["scores"]
            rows.append([label, name, f"{100 * s['accuracy']:.1f} +- {100 * s['accuracy_ci95']:.1f}",
                         f"{s['loss']:.3f} +- {s['loss_ci95']:.3f}",
                         "-" if entry["seconds_per_meta_step"] is None else entry["seconds_per_meta_step"] * 1e3,
                         entry["num_skipped"]])
    print(f"\nTest episodes ({args.test_episodes} per row; 95% confidence intervals; classes and alphabets unseen in training)")
    print(format_table(["setting", "learner", "accuracy %", "cross-entropy", "ms/meta-step", "skipped"], rows, digits=1))
    for label, setting in settings.items():
        learned = {n: e["sigma"] for n, e in setting["learners"].items() if "sigma" in e}
        if learned:
            print(f"\nLearned sigma per layer, {label} (small: shared across tasks; large: free per task)")
            print(format_table(["learner", *setting["modules"]], [[n, *v] for n, v in learned.items()], digits=4))
    for label, setting in settings.items():
        moved = {n: e["movement"] for n, e in setting["learners"].items() if "movement" in e}
        if moved:
            print(f"\nHow far adaptation moves each layer, {label}: RMS(theta_hat - phi) / RMS(phi) on "
                  f"{min(50, args.test_episodes)} test episodes")
            print(format_table(["learner", *setting["modules"]], [[n, *v] for n, v in moved.items()], digits=4))
    out = Path(args.out)
    path = write_json(out / "fewshot.json", {
        "schema": "hiermeta/fewshot/v1", "data": source, "num_classes": dataset.num_classes,
        "split_sizes": {k: int(v.size) for k, v in splits.items()},
        "config": vars(args), "jax_version": jax.__version__, "settings": settings,
        "seconds": time.perf_counter() - t_start})
    print(f"\nwrote {path}")
    if not args.no_plot:
        print(f"wrote {plot(settings, out / 'fewshot.png')}")


if __name__ == "__main__":
    main()
