"""The NeurIPS protocol of the shrinkage paper on the glyph stand-in: alphabets as tasks, long inner loops.

Chen et al.'s NeurIPS version evaluates sigma-Reptile and sigma-iMAML on augmented Omniglot with
the protocol of Leap and WarpGrad: each task is one alphabet, 20 of its characters (20-way), 15
training and 5 validation images per character, random affine augmentation, 100 inner steps of
minibatch SGD; the learned per-layer sigmas are meant to find which layers to adapt.  This study
runs that protocol on the rendered glyph set (``hiermeta.models.glyphs``: a stand-in, NOT
Omniglot; ``--omniglot ROOT`` for the real data) with four learners, one sigma per layer:

    M-sigma-Reptile  Reptile's phi step after K minibatch steps on the shrinkage-regularised loss,
                     sigma by the exact PLL hypergradient (CG)          (hm.learners.m_sigma_reptile)
    Reptile          the same K minibatch steps without a prior (sigma fixed at 1e4)
    M-sigma-iMAML    phi and sigma by the exact PLL hypergradient
    iMAML            phi by it, sigma fixed (lambda = 1 / sigma^2)

The same K minibatch steps (proximal SGD, rate ``--inner-lr`` on the mean cross-entropy, batches
of ``--inner-batch`` images) adapt every learner, in training and at test.  Meta-validation
alphabets (``splits["val"]``) choose the state kept (early stopping: validation accuracy every
``--val-every`` meta-steps).  Each learner runs for every seed; the seed fixes the initialisation
and every task drawn, so learners are compared paired by seed.

Reported: test accuracy on the held-out alphabets (mean over ``--test-episodes`` alphabet tasks,
95% interval over them) per seed; the mean over seeds with a 95% t-interval over seeds; the
learned-minus-fixed difference (sigma-Reptile - Reptile, sigma-iMAML - iMAML) paired by seed with
its t-interval; the learned sigma per layer and how far adaptation moves each layer; the run-off
check (``hiermeta.learners.check_run_off``).

The default run is sized for 2 shared CPU cores (minutes per learner and seed): 16 x 16 images,
8 filters, 2 blocks, 40 meta-steps of 2 alphabet tasks.  The published protocol runs a 4-block,
64-filter network at 28 x 28 for thousands of meta-steps; this is not that.

    python examples/fewshot_alphabets.py --seeds 0 1 2 --out docs/benchmarks
    python examples/fewshot_alphabets.py --quick      # smoke run
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
from hiermeta.implicit import cg_solve  # noqa: E402
from hiermeta.learners import check_run_off, gaussian_prior_learner, minibatch_steps, phi_sigma_optimizer, proximal_sgd, sigma_of  # noqa: E402
from hiermeta.models import fewshot  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import count, format_table, positive_float, prng_seed, study_parser, write_json  # noqa: E402
from _fewshot_study import layer_movement, paired_difference, seed_interval, train_with_validation  # noqa: E402
from fewshot import load_data  # noqa: E402  (examples/fewshot.py: the glyph set, or Omniglot with --omniglot)

LEARNERS = ("M-sigma-Reptile", "Reptile", "M-sigma-iMAML", "iMAML")
PAIRS = (("M-sigma-Reptile", "Reptile"), ("M-sigma-iMAML", "iMAML"))
NO_PRIOR = 1e4  # Reptile: a prior this wide does not move the K steps (sigma-Reptile's sigma -> inf limit)


def build_parser():
    p = study_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny network, few steps and episodes")
    p.add_argument("--out", default="results", help="output directory for fewshot_alphabets.json")
    p.add_argument("--seeds", type=prng_seed, nargs="+", default=[0, 1, 2], help="seeds (initialisation and tasks)")
    p.add_argument("--learners", nargs="+", choices=LEARNERS, help="learners to run (default all)")
    p.add_argument("--ways", type=count(2), default=20, help="characters per alphabet task")
    p.add_argument("--train-shots", type=count(1), default=15, help="training images per character")
    p.add_argument("--val-shots", type=count(1), default=5, help="validation images per character")
    p.add_argument("--image-size", type=count(8), help="image side (default 16, quick 12)")
    p.add_argument("--filters", type=count(1), help="conv filters per block (default 8, quick 4)")
    p.add_argument("--blocks", type=count(1), help="conv blocks (default 2)")
    p.add_argument("--meta-steps", type=count(1), help="meta-steps (default 40, quick 4)")
    p.add_argument("--batch-size", type=count(1), help="alphabet tasks per meta-step (default 2)")
    p.add_argument("--inner-steps", type=count(1), help="K minibatch steps, training and test (default 100, quick 10)")
    p.add_argument("--inner-batch", type=count(1), default=20, help="images per inner minibatch")
    p.add_argument("--inner-lr", type=positive_float, default=0.1, help="inner SGD rate on the mean cross-entropy")
    p.add_argument("--outer-lr", type=positive_float, default=3e-3, help="Adam rate on phi (sigma-iMAML, iMAML)")
    p.add_argument("--reptile-beta", type=positive_float, default=1.0,
                   help="Reptile's outer step on phi (sigma-Reptile, Reptile), decayed linearly to 0")
    p.add_argument("--sigma-lr", type=positive_float, default=0.1, help="Adam rate on log sigma^2")
    p.add_argument("--init-sigma", type=positive_float, default=0.3,
                   help="initial sigma of the sigma learners, and iMAML's fixed sigma")
    p.add_argument("--cg-iterations", type=count(1), default=5, help="CG iterations of the exact hypergradients")
    p.add_argument("--val-every", type=count(1), help="meta-steps between meta-validations (default 10, quick 2)")
    p.add_argument("--val-episodes", type=count(2), help="validation alphabet tasks per check (default 6, quick 2)")
    p.add_argument("--test-episodes", type=count(2), help="test alphabet tasks per learner and seed (default 30, quick 4)")
    p.add_argument("--no-augment", action="store_true", help="turn the random affine augmentation off")
    p.add_argument("--omniglot", help="Omniglot root instead of the glyph set")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.learners = args.learners or list(LEARNERS)
    q = args.quick
    args.image_size = args.image_size or (12 if q else 16)
    args.filters = args.filters or (4 if q else 8)
    args.blocks = args.blocks or 2
    args.meta_steps = args.meta_steps or (4 if q else 40)
    args.batch_size = args.batch_size or 2
    args.inner_steps = args.inner_steps or (10 if q else 100)
    args.val_every = args.val_every or (2 if q else 10)
    args.val_episodes = args.val_episodes or (2 if q else 6)
    args.test_episodes = args.test_episodes or (4 if q else 30)
    return args


def make_learner(name, args, model):
    n_support = args.ways * args.train_shots
    inner = minibatch_steps(proximal_sgd(args.inner_lr / n_support), args.inner_steps, args.inner_batch)
    cg = cg_solve(maxiter=args.cg_iterations, tol=1e-6)
    beta = optax.linear_schedule(args.reptile_beta, 0.0, args.meta_steps)
    reptile_outer = phi_sigma_optimizer(optax.sgd(beta), optax.adam(args.sigma_lr))
    imaml_outer = phi_sigma_optimizer(optax.adam(args.outer_lr), optax.adam(args.sigma_lr))
    common = dict(inner_optimizer=inner, name=name)
    if name == "M-sigma-Reptile":
        return gaussian_prior_learner(model, phi_step="reptile", sigma_step=cg, modular=True,
                                      init_sigma=args.init_sigma, outer_optimizer=reptile_outer, **common)
    if name == "Reptile":
        return gaussian_prior_learner(model, phi_step="reptile", sigma_step="fixed", fixed_sigma=NO_PRIOR,
                                      outer_optimizer=optax.sgd(beta), **common)
    if name == "M-sigma-iMAML":
        return gaussian_prior_learner(model, phi_step="pll", phi_hypergradient=cg, sigma_step=cg, modular=True,
                                      init_sigma=args.init_sigma, outer_optimizer=imaml_outer, **common)
    return gaussian_prior_learner(model, phi_step="pll", phi_hypergradient=cg, sigma_step="fixed",
                                  fixed_sigma=args.init_sigma, outer_optimizer=optax.adam(args.outer_lr), **common)


def run_one(name, seed, args, dataset, splits):
    net = fewshot.convnet(args.ways, args.image_size, filters=args.filters, blocks=args.blocks)
    k_init, k_train, k_val, k_test = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = net.init(k_init)
    model = fewshot.make_model(net, params)
    augment = None if args.no_augment else fewshot.Augmentation()
    spec = dict(ways=args.ways, train_shots=args.train_shots, val_shots=args.val_shots, augment=augment)
    sampler = lambda split, n: fewshot.alphabet_sampler(dataset.images, splits[split], dataset.class_alphabet,
                                                        num_tasks=n, **spec)
    learner = make_learner(name, args, model)
    state = learner.init(k_init, params)
    val_sample = sampler("val", args.val_episodes)
    validate = lambda s: fewshot.evaluate_episodes(learner, s, val_sample, args.val_episodes, key=k_val,
                                                   num_steps=args.inner_steps).accuracy
    t0 = time.perf_counter()
    state, history, record = train_with_validation(learner, state, sampler("train", args.batch_size), args.meta_steps,
                                                   data_key=k_train, val_every=args.val_every, validate=validate)
    test_sample = sampler("test", min(10, args.test_episodes))
    scores = fewshot.evaluate_episodes(learner, state, test_sample, args.test_episodes, key=k_test,
                                       num_steps=args.inner_steps)
    entry = {"seed": seed, "scores": scores.to_dict(), **record, "num_skipped": int(state.num_skipped),
             "movement": layer_movement(learner, state, test_sample(k_test).train, args.inner_steps, model.partition),
             "seconds": time.perf_counter() - t0}
    if "log_sigma2" in state.params:
        entry["sigma"] = np.asarray(sigma_of(state.params, model.partition.num_modules))
        entry["run_off"] = check_run_off(history, names=model.partition.names, who=f"{name} seed {seed}").to_dict()
    return entry, list(model.partition.names)


def main(argv=None):
    args = parse_args(argv)
    hm.enable_compilation_cache()
    t_start = time.perf_counter()
    dataset, splits, source = load_data(args)
    print(f"data: {source}: {dataset.num_classes} classes of {len(dataset.alphabets)} alphabets; "
          f"{args.ways}-way alphabet tasks, {args.train_shots} + {args.val_shots} images per character, "
          f"K = {args.inner_steps} minibatch steps of {args.inner_batch}", flush=True)
    runs, modules = {name: [] for name in args.learners}, None
    for seed in args.seeds:
        for name in args.learners:
            entry, modules = run_one(name, seed, args, dataset, splits)
            runs[name].append(entry)
            s = entry["scores"]
            print(f"  seed {seed} {name:16s} test accuracy {100 * s['accuracy']:.1f} +- {100 * s['accuracy_ci95']:.1f}%"
                  f"  (best validation at step {entry['best_step']}; {entry['seconds']:.0f} s)", flush=True)
    summary = {}
    for name, entries in runs.items():
        acc = [e["scores"]["accuracy"] for e in entries]
        mean, half = seed_interval(acc)
        summary[name] = {"accuracy": mean, "accuracy_ci95_over_seeds": half, "per_seed": acc}
        if "sigma" in entries[0]:
            summary[name]["sigma_mean_over_seeds"] = np.mean([e["sigma"] for e in entries], axis=0)
        summary[name]["movement_mean_over_seeds"] = np.mean([e["movement"] for e in entries], axis=0)
    pairs = {}
    for learned, fixed in PAIRS:
        if learned in runs and fixed in runs:
            diff, half = paired_difference(summary[learned]["per_seed"], summary[fixed]["per_seed"])
            pairs[f"{learned} - {fixed}"] = {"difference": diff, "ci95_over_seeds": half}
    rows = [[name, f"{100 * v['accuracy']:.1f} +- {100 * v['accuracy_ci95_over_seeds']:.1f}",
             " ".join(f"{100 * a:.1f}" for a in v["per_seed"])] for name, v in summary.items()]
    print(f"\nTest accuracy %, {args.ways}-way alphabet tasks, mean over {len(args.seeds)} seeds (95% t-interval "
          f"over seeds), {args.test_episodes} test tasks per seed")
    print(format_table(["learner", "accuracy %", "per seed"], rows))
    if pairs:
        print("\nLearned sigma minus fixed sigma, paired by seed (95% t-interval)")
        print(format_table(["pair", "difference (points)"],
                           [[k, f"{100 * v['difference']:+.1f} +- {100 * v['ci95_over_seeds']:.1f}"] for k, v in pairs.items()]))
    sig = [[n, *v["sigma_mean_over_seeds"]] for n, v in summary.items() if "sigma_mean_over_seeds" in v]
    if sig:
        print("\nLearned sigma per layer (mean over seeds)")
        print(format_table(["learner", *modules], sig, digits=4))
    print("\nRMS(theta_hat - phi) / RMS(phi) per layer on test tasks (mean over seeds)")
    print(format_table(["learner", *modules], [[n, *v["movement_mean_over_seeds"]] for n, v in summary.items()], digits=4))
    path = write_json(Path(args.out) / "fewshot_alphabets.json", {
        "schema": "hiermeta/fewshot_alphabets/v1", "data": source, "config": vars(args), "modules": modules,
        "jax_version": jax.__version__, "runs": runs, "summary": summary, "learned_minus_fixed": pairs,
        "seconds": time.perf_counter() - t_start})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
