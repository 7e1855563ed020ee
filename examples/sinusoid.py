"""Sinusoid regression with a neural network: which layers should adapt to a task?

M-Shrinkage meta-trains an MLP 1-40-40-1 on the MAML sinusoid tasks with one shrinkage scale
per layer (weights and bias of a layer form one module), then adapts to held-out tasks.  The
learned sigma says how far each layer moves from the shared phi for a new task.

Long runs survive interruption: ``--checkpoint`` writes the whole meta-state (and the history
so far) every ``--checkpoint-every`` steps, and the same command with ``--resume`` continues
from the last checkpoint to a result bit-identical to an uninterrupted run (an existing
checkpoint is never replaced unless ``--overwrite`` says so).  ``--devices N``
splits each batch of tasks over N devices (``hiermeta.sharding``).  JAX's persistent
compilation cache makes a second run start fast.

    python examples/sinusoid.py                                   # about a minute on 2 cores
    python examples/sinusoid.py --out DIR                         # sinusoid.json and sinusoid.png in DIR (default results/)
    python examples/sinusoid.py --quick
    python examples/sinusoid.py --checkpoint run.npz --checkpoint-every 500      # ... interrupted
    python examples/sinusoid.py --checkpoint run.npz --checkpoint-every 500 --resume
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
from hiermeta.learners import sigma_of  # noqa: E402
from hiermeta.models import sinusoid  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py, also when loaded from elsewhere
from _common import count, format_table, plot_loss_curves, positive_float, prng_seed, pyplot, save_figure, study_parser, write_json  # noqa: E402

REPORT_STEPS = (0, 1, 5, 10, 20)


def build_parser():
    p = study_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="short smoke run")
    p.add_argument("--out", default="results", help="output directory for sinusoid.json and sinusoid.png")
    p.add_argument("--meta-steps", type=count(1), help="meta-iterations (default 3000, quick 300)")
    p.add_argument("--batch-size", type=count(1), default=25, help="tasks per meta-iteration")
    p.add_argument("--inner-steps", type=count(1), default=5, help="K, inner SGD steps while meta-training")
    p.add_argument("--inner-lr", type=positive_float, default=sinusoid.MAML_INNER_LR,
                   help="inner SGD rate on 1/2 sum of squares (MAML's 0.01 on the MSE)")
    p.add_argument("--outer-lr", type=positive_float, default=0.01, help="Adam learning rate")
    p.add_argument("--test-tasks", type=count(2), default=1000, help="held-out tasks")
    p.add_argument("--seed", type=prng_seed, default=0, help="seed of the initial weights, the task stream and the held-out tasks")
    p.add_argument("--checkpoint", help="checkpoint file (.npz)")
    p.add_argument("--checkpoint-every", type=count(1), help="meta-steps between checkpoints (default: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --checkpoint file (else refused)")
    p.add_argument("--devices", type=count(1), help="split each batch's tasks over this many devices")
    p.add_argument("--no-plot", action="store_true", help="write no figure")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if (args.resume or args.overwrite or args.checkpoint_every) and not args.checkpoint:
        p.error("--resume, --overwrite and --checkpoint-every need --checkpoint")
    if args.resume and args.overwrite:
        p.error("--resume continues the checkpoint and --overwrite replaces it: give one of them")
    if args.checkpoint and Path(args.checkpoint).exists() and not (args.resume or args.overwrite):
        p.error(f"--checkpoint {args.checkpoint} already exists: add --resume to continue it or --overwrite to "
                "replace it")
    return args


def main(argv=None):
    args = parse_args(argv)
    hm.enable_compilation_cache()
    meta_steps = args.meta_steps if args.meta_steps is not None else (300 if args.quick else 3000)
    t_start = time.perf_counter()
    domain = sinusoid.maml_domain()
    k_init, k_data, k_test = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    params = sinusoid.init_mlp(k_init)
    model = sinusoid.make_model(params)  # one module per layer
    learner = hm.m_shrinkage(model, inner_optimizer=optax.sgd(args.inner_lr), inner_steps=args.inner_steps,
                             outer_optimizer=optax.adam(args.outer_lr))
    state = learner.init(k_init, params)
    sample = lambda key: sinusoid.sample_tasks(domain, key, args.batch_size)[1]
    mesh = hm.sharding.task_mesh(num_devices=args.devices) if args.devices else None
    state, history = hm.fit(learner, state, sample, meta_steps, data_key=k_data, checkpoint=args.checkpoint,
                            checkpoint_every=args.checkpoint_every, resume=args.resume, overwrite=args.overwrite,
                            mesh=mesh)
    print(f"[{time.perf_counter() - t_start:6.1f}s] meta-trained {learner.name} for {meta_steps} steps "
          f"({int(state.num_skipped)} skipped)")

    _, test = sinusoid.sample_tasks(domain, k_test, args.test_tasks)
    last = max(REPORT_STEPS)
    trained = hm.evaluate(learner, state, test, last)
    untrained = hm.evaluate(learner, learner.init(k_init, params), test, last)
    sigma = np.asarray(sigma_of(state.params, model.partition.num_modules))
    print("\nLearned shrinkage per layer (sigma: how far a task moves each layer from phi)")
    print(format_table(["module", "size", "sigma"],
                       [[n, int(s), v] for n, s, v in zip(model.partition.names, model.partition.module_sizes, sigma)]))
    print(f"\nHeld-out loss (half the query MSE) on {args.test_tasks} tasks vs adaptation steps")
    rows = [[name, *[c.at(k) for k in REPORT_STEPS], f"+-{c.sem[last]:.3f}"]
            for name, c in (("meta-trained", trained), ("initial weights", untrained))]
    print(format_table(["", *[f"k={k}" for k in REPORT_STEPS], "sem"], rows))
    out = Path(args.out)
    path = write_json(out / "sinusoid.json", {
        "schema": "hiermeta/sinusoid/v1", "config": {**vars(args), "meta_steps": meta_steps},
        "modules": list(model.partition.names), "sigma": sigma, "curve": trained, "untrained_curve": untrained,
        "history": {"val_log_lik": history["val_log_lik"], "sigma": history["sigma"]},
        "seconds": time.perf_counter() - t_start})
    print(f"wrote {path}")
    if not args.no_plot:
        print(f"wrote {plot(out / 'sinusoid.png', trained, untrained, history, model.partition.names)}")


def plot(path, trained, untrained, history, modules):
    plt = pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
    plot_loss_curves(ax0, {"meta-trained (M-Shrinkage)": trained, "initial weights": untrained})
    ax0.set_yscale("log")
    ax0.set_ylabel("held-out loss (half the query MSE)")
    ax0.set_title("Sinusoid: held-out loss (band: mean +- sem)")
    sigma = np.asarray(history["sigma"])
    for m, name in enumerate(modules):
        ax1.plot(np.arange(1, len(sigma) + 1), sigma[:, m], label=name)
    ax1.set_yscale("log")
    ax1.set_xlabel("meta-step")
    ax1.set_ylabel("sigma")
    ax1.set_title("Learned shrinkage per layer")
    ax1.legend(fontsize=8)
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
