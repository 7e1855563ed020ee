"""Meta-training over several processes (hosts) with JAX's multi-controller runtime.

The same script runs in every process.  Each calls ``jax.distributed.initialize`` first, then
trains M-Shrinkage on the paper's linear domain with ``hiermeta.fit(..., mesh=task_mesh())``: each
meta-step's tasks are split over every device of every process, the meta-state is replicated,
process 0 writes the checkpoint (every process can resume from it) and the results; the
held-out evaluation is split over the same mesh.  See docs/distributed.md.

Launching:

    # on this machine, 2 processes with 2 CPU devices each (the script starts them itself)
    python examples/multiprocess.py --local 2 --devices-per-process 2 --quick

    # Slurm, one process per host: jax.distributed.initialize() reads the job's variables
    srun --nodes=4 --ntasks-per-node=1 python examples/multiprocess.py

    # any other launcher: say where process 0 listens, how many processes, which one this is
    python examples/multiprocess.py --coordinator host0:1234 --num-processes 4 --process-id $RANK

    # GPUs: one process per host sees all its GPUs (or one process per GPU with
    # CUDA_VISIBLE_DEVICES / JAX's local_device_ids); collectives go over NCCL
    JAX_PLATFORMS=cuda srun --ntasks-per-node=1 python examples/multiprocess.py

Writes ``OUT/multiprocess.json`` (learned sigma and phi, the held-out loss, the layout of the job)
and ``OUT/multiprocess.png`` (sigma over the meta-steps), from process 0 only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py, also when loaded from elsewhere

from _common import count, study_parser  # noqa: E402  (importing creates no JAX backend)


def build_parser() -> argparse.ArgumentParser:
    p = study_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="a smoke run: 60 meta-steps, 200 held-out tasks")
    p.add_argument("--out", default="results", help="output directory for multiprocess.json and multiprocess.png")
    p.add_argument("--local", type=count(1), metavar="N",
                   help="start N processes on this machine (coordinator on a free localhost port) and wait")
    p.add_argument("--devices-per-process", type=count(1), metavar="D",
                   help="with --local: D simulated CPU devices per process")
    p.add_argument("--coordinator", help="HOST:PORT of process 0 (else auto-detected under Slurm, Open MPI, TPU pods)")
    p.add_argument("--num-processes", type=count(1), help="how many processes the job has (with --coordinator)")
    p.add_argument("--process-id", type=count(0), help="this process's index, 0..N-1 (with --coordinator)")
    p.add_argument("--single", action="store_true", help="run in this process alone, without jax.distributed")
    p.add_argument("--meta-steps", type=count(1), help="meta-steps (default 600, quick 60)")
    p.add_argument("--batch-size", type=count(1), default=32, help="tasks per meta-step, split over every device")
    p.add_argument("--test-tasks", type=count(2), help="held-out tasks (default 1000, quick 200)")
    p.add_argument("--checkpoint", help="checkpoint file on a file system every process sees (default: OUT/multiprocess-STEPS.ckpt.npz)")
    p.add_argument("--no-plot", action="store_true", help="write no figure")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def launch_local(args, argv) -> int:
    """Start ``args.local`` copies of this script as the processes of one job on localhost."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    if args.devices_per_process:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={args.devices_per_process}").strip()
    rest = [a for a in argv if a not in ("--local", str(args.local), "--devices-per-process",
                                         str(args.devices_per_process))]
    procs = [subprocess.Popen([sys.executable, __file__, *rest, "--coordinator", f"localhost:{port}",
                               "--num-processes", str(args.local), "--process-id", str(i)], env=env)
             for i in range(args.local)]
    codes = [p.wait() for p in procs]
    return max(codes, key=abs)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.local:
        raise SystemExit(launch_local(args, argv))

    import jax

    if not args.single:  # before any other JAX call
        if args.coordinator:
            jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
        else:
            jax.distributed.initialize()  # Slurm, Open MPI, TPU pods, Kubernetes: auto-detected
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import optax

    import hiermeta as hm
    from hiermeta.distributed import is_primary
    from hiermeta.sharding import task_mesh
    from hiermeta.models import linear

    hm.enable_compilation_cache()
    steps = args.meta_steps or (60 if args.quick else 600)
    test_tasks = args.test_tasks or (200 if args.quick else 1000)
    out = Path(args.out)
    checkpoint = Path(args.checkpoint) if args.checkpoint else out / f"multiprocess-{steps}.ckpt.npz"
    mesh = task_mesh()  # every device of every process
    say = print if is_primary() else (lambda *a, **k: None)
    say(f"{jax.process_count()} process(es), {jax.device_count()} devices "
        f"({jax.local_device_count()} in this process), {args.batch_size} tasks per meta-step", flush=True)

    paper = linear.paper_domain()
    learner = hm.m_shrinkage(linear.make_model(8), inner_optimizer=optax.sgd(0.3), inner_steps=100,
                             outer_optimizer=optax.adam(0.03))
    state = learner.init(jax.random.PRNGKey(0), jnp.zeros(8))
    sample = lambda key: linear.sample_tasks(paper, key, args.batch_size)[1]  # noqa: E731  drawn on the devices
    t0 = time.perf_counter()
    state, history = hm.fit(learner, state, sample, steps, data_key=jax.random.PRNGKey(1), chunk_size=20,
                            progress=is_primary(), mesh=mesh, checkpoint=checkpoint,
                            checkpoint_every=max(steps // 3, 1), resume=True)
    train_s = time.perf_counter() - t0
    _, held_out = linear.sample_tasks(paper, jax.random.PRNGKey(2), test_tasks)
    curve = hm.evaluate(learner, state, held_out, num_steps=100, mesh=mesh)
    sigma = np.asarray(hm.sigma_of(state.params, 8))
    say(f"sigma after {steps} meta-steps: {np.round(sigma, 2)} (truth {paper.sigma.tolist()}); "
        f"held-out loss after 100 steps {curve.mean[-1]:.3f} +- {curve.sem[-1]:.3f}; training {train_s:.1f} s")
    if is_primary():
        out.mkdir(parents=True, exist_ok=True)
        record = {"processes": jax.process_count(), "devices": jax.device_count(), "meta_steps": steps,
                  "batch_size": args.batch_size, "sigma": sigma.tolist(), "phi": np.asarray(state.params["phi"]).tolist(),
                  "true_sigma": np.asarray(paper.sigma).tolist(), "held_out_loss": curve.to_dict(),
                  "train_seconds": train_s, "quick": args.quick}
        (out / "multiprocess.json").write_text(json.dumps(record, indent=1) + "\n")
        if not args.no_plot:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(np.asarray(history["sigma"]) if "sigma" in history else np.zeros((steps, 8)))
            ax.set(xlabel="meta-step", ylabel="sigma per module", yscale="log",
                   title=f"M-Shrinkage over {jax.process_count()} processes, {jax.device_count()} devices")
            fig.tight_layout()
            fig.savefig(out / "multiprocess.png", dpi=120)
        say(f"wrote {out / 'multiprocess.json'}")


if __name__ == "__main__":
    main()
