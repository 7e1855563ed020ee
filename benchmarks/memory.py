"""Peak memory of one meta-step against the number of inner steps K (5, 50, 500).

Sinusoid MLP (1761 parameters), meta-batch 25, float32.  Learners: MAML unrolled (backprop
through K steps stores every step's residuals: memory grows with K), MAML with
rematerialisation (``remat=True``: stores the carries only, recomputes each step), iMAML and
sigma-iMAML (implicit hypergradients by CG at the inner solution: memory flat in K), and
M-Shrinkage (the paper's Eq. 4, also implicit).

Two figures per (learner, K):
  compiled   XLA's buffer assignment for ``jit(learner.step)``: ``temp_size_in_bytes`` of
             ``compiled.memory_analysis()``, the scratch the step allocates beyond its arguments
             and outputs (which are the meta-state and the batch, tens of kB here);
  measured   in a fresh subprocess: the rise of the resident set (``VmHWM`` after resetting it
             with ``/proc/self/clear_refs``) while the compiled step runs once, with
             ``MALLOC_MMAP_THRESHOLD_`` low so that freed buffers return to the OS (Linux only;
             the largest of three executions).

    python benchmarks/memory.py             # compiled and measured
    python benchmarks/memory.py --quick     # compiled only
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from common import format_table, note, parser, settle, write_results  # noqa: I001

import jax  # noqa: E402
import optax  # noqa: E402

import registry  # noqa: E402

KS = (5, 50, 500)
MB = 2**20


def build(name, K):
    domain = registry.domains(only=["sinusoid"])[0][0]
    learner, why = registry.build(registry.MEMORY_LEARNERS, name, domain.model, K, domain.inner_lr, optax.adam(1e-3))
    if learner is not None:
        why = None
    return domain, learner, why


def compiled_memory(name, K):
    domain, learner, why = build(name, K)
    if learner is None:
        return None, why
    state = learner.init(jax.random.PRNGKey(0), domain.params)
    batch = domain.sample(jax.random.PRNGKey(1))
    compiled = jax.jit(learner.step).lower(state, batch).compile()
    stats = compiled.memory_analysis()
    return {"temp_bytes": stats.temp_size_in_bytes, "argument_bytes": stats.argument_size_in_bytes,
            "output_bytes": stats.output_size_in_bytes}, why


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure_here(name, K):
    """(Run in a subprocess.) Resident-set rise during one execution of the compiled step."""
    domain, learner, why = build(name, K)
    if learner is None:
        return {"skipped": why}
    state = learner.init(jax.random.PRNGKey(0), domain.params)
    batch = domain.sample(jax.random.PRNGKey(1))
    step = jax.jit(learner.step).lower(state, batch).compile()
    jax.block_until_ready(step(state, batch))  # warm: first-run allocations
    rises = []
    for _ in range(3):  # the largest of three executions
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        base = _status("VmRSS")
        jax.block_until_ready(step(state, batch))
        rises.append(_status("VmHWM") - base)
    return {"measured_bytes": max(rises), "measured_runs": rises}


def measure(name, K, timeout=900):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", name, str(K)], env=env,
                         capture_output=True, text=True, timeout=timeout)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr or out.stdout)[-500:]}
    return json.loads(lines[-1])


def main(argv=None):
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(measure_here(sys.argv[2], int(sys.argv[3]))))
        return
    p = parser(__doc__)
    p.add_argument("--inner-steps", type=int, nargs="+", default=list(KS))
    p.add_argument("--no-measured", action="store_true", help="compiled figures only")
    args = settle(p.parse_args(argv))
    measured = not (args.quick or args.no_measured) and Path("/proc/self/clear_refs").exists()
    results, rows, notes = {}, [], {}
    for name in registry.MEMORY_LEARNERS:
        results[name] = {}
        for K in args.inner_steps:
            entry, why = compiled_memory(name, K)
            if entry is None:
                notes[name] = why
                break
            if why:
                notes[name] = why
            if measured:
                entry.update(measure(name, K))
            results[name][K] = entry
            print(f"  {name:22s} K={K:4d} temp {entry['temp_bytes'] / MB:8.2f} MiB"
                  + (f"  measured {entry['measured_bytes'] / MB:8.2f} MiB" if "measured_bytes" in entry else ""),
                  flush=True)
    Ks = args.inner_steps
    for name, by_k in results.items():
        if not by_k:
            continue
        row = [name] + [by_k[K]["temp_bytes"] / MB for K in Ks] + [by_k[Ks[-1]]["temp_bytes"] / by_k[Ks[0]]["temp_bytes"]]
        if measured:
            got = [by_k[K].get("measured_bytes") for K in Ks]
            row += [g / MB if g is not None else float("nan") for g in got]
            row += [got[-1] / got[0] if None not in (got[0], got[-1]) and got[0] > 0 else float("nan")]
        rows.append(row)
    headers = ["learner"] + [f"K={K} MiB" for K in Ks] + [f"K={Ks[-1]}/K={Ks[0]}"]
    if measured:
        headers += [f"meas. K={K}" for K in Ks] + ["meas. ratio"]
    print("\nPeak memory of one meta-step (sinusoid MLP, meta-batch 25, float32): compiled temp buffers"
          + (", and measured resident-set rise" if measured else ""))
    print(format_table(headers, rows, 2))
    for name, why in notes.items():
        note(f"{name}: {why}")
    write_results(args, "memory", {"results": results, "notes": notes, "measured": measured})


if __name__ == "__main__":
    main()
