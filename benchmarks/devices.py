"""Tasks per second against the number of devices: ``hiermeta.fit(..., mesh=task_mesh())``.

Each device count runs in a fresh process (JAX fixes its devices at start-up), on CPU with
``--xla_force_host_platform_device_count=N`` simulated devices unless real accelerators are
present.  Workload: M-Shrinkage (and MAML if this checkout has it) on the sinusoid MLP, K = 5,
meta-batch ``--tasks`` (default 100) drawn on the devices inside the compiled loop.  The figure
is tasks/second = meta-batch x meta-steps/second (median of blocks of ``--steps`` meta-steps).

On a CPU the simulated devices share the machine's cores: the speed-up is bounded by the number
of physical cores (2 here), and XLA's own intra-op threads already use them at one device.  The
benchmark shows the code path scales and what it costs; on GPUs each device adds its own.

    python benchmarks/devices.py              # 1, 2, 4 devices
    python benchmarks/devices.py --quick
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import format_table, note, parser, settle, write_results  # noqa: I001


def measure_here(num_devices: int, tasks: int, steps: int, repeats: int) -> dict:
    import jax
    import optax

    import hiermeta as hm
    from hiermeta.models import sinusoid

    assert jax.device_count() >= num_devices, jax.devices()
    mesh = hm.sharding.task_mesh(num_devices=num_devices)
    domain = sinusoid.maml_domain()
    params = sinusoid.init_mlp(jax.random.PRNGKey(0))
    model = sinusoid.make_model(params)
    sample = lambda key: sinusoid.sample_tasks(domain, key, tasks)[1]
    learners = {
        "M-Shrinkage": hm.m_shrinkage(model, inner_optimizer=optax.sgd(sinusoid.MAML_INNER_LR), inner_steps=5,
                                      outer_optimizer=optax.adam(1e-3)),
        "MAML": hm.maml(model, inner_steps=5, init_lr=sinusoid.MAML_INNER_LR, outer_optimizer=optax.adam(1e-3)),
    }
    out = {}
    for name, learner in learners.items():
        state = learner.init(jax.random.PRNGKey(0), params)
        kwargs = dict(data_key=jax.random.PRNGKey(1), chunk_size=steps, progress=False, mesh=mesh)
        t0 = time.perf_counter()
        hm.fit(learner, state, sample, steps, **kwargs)  # compile + one warm chunk
        first = time.perf_counter() - t0
        blocks = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            s, _ = hm.fit(learner, state, sample, steps, **kwargs)
            jax.block_until_ready(s)
            blocks.append((time.perf_counter() - t0) / steps)
        out[name] = {"seconds_per_step": statistics.median(blocks), "blocks": blocks, "first_chunk_seconds": first}
    return out


def main(argv=None):
    if argv is None and len(sys.argv) == 6 and sys.argv[1] == "--one":
        n, tasks, steps, repeats = (int(a) for a in sys.argv[2:])
        print(json.dumps(measure_here(n, tasks, steps, repeats)))
        return
    p = parser(__doc__)
    p.add_argument("--devices", type=int, nargs="+", help="device counts (default 1 2 4)")
    p.add_argument("--tasks", type=int, default=100, help="meta-batch size")
    p.add_argument("--steps", type=int, help="meta-steps per timed block (default 50, quick 20)")
    args = settle(p.parse_args(argv))
    counts = args.devices or [1, 2, 4]
    steps = args.steps or (20 if args.quick else 50)
    results, rows = {}, []
    for n in counts:
        env = dict(os.environ)
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(n), str(args.tasks), str(steps),
               str(args.repeats)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            note(f"{n} devices failed: {(out.stderr or out.stdout)[-400:]}")
            continue
        results[n] = json.loads(lines[-1])
        for name, r in results[n].items():
            base = results[counts[0]][name]["seconds_per_step"]
            rows.append([n, name, args.tasks / r["seconds_per_step"], 1 / r["seconds_per_step"],
                         base / r["seconds_per_step"], r["first_chunk_seconds"]])
            print(f"  {n} devices, {name}: {args.tasks / r['seconds_per_step']:.0f} tasks/s", flush=True)
    print(f"\nTasks per second vs devices (sinusoid MLP, K = 5, meta-batch {args.tasks}, {os.cpu_count()} CPU cores)")
    print(format_table(["devices", "learner", "tasks/s", "meta-steps/s", f"x {counts[0]} device",
                        "compile+chunk s"], rows, 2))
    write_results(args, "devices", {"results": results, "tasks": args.tasks, "steps_per_block": steps})


if __name__ == "__main__":
    main()
