"""Cold and warm starts of the main job, ``python examples/linear_toy.py``, phase by phase.

Each run is a fresh process.  *Cold*: JAX's persistent compilation cache points at an empty
directory, so every program is compiled by XLA; *warm*: the same job again on the cache the cold
run filled (what a user sees the second time).  Cold and warm runs alternate, each pair on its own
new cache directory; medians over ``--repeats`` pairs.

Per phase of the job (``examples/linear_toy.py`` records them in ``PHASES``): wall seconds, the
number of XLA compilations (backend compiles that were not served by the persistent cache), the
cache hits, and the seconds spent tracing and lowering to XLA and in XLA (or reading the cache).
Counted with ``jax.monitoring`` listeners:

    /jax/core/compile/backend_compile_duration      every backend compile request (hit or miss)
    /jax/compilation_cache/cache_hits               requests served from the persistent cache
    /jax/core/compile/jaxpr_trace_duration          tracing a function to a jaxpr
    /jax/core/compile/jaxpr_to_mlir_module_duration lowering a jaxpr to MLIR

``import`` is the time from the start of the child's Python code to the job's module being
imported (jax, numpyro, optax, scipy, hiermeta); ``process`` is the whole subprocess as the
parent sees it (interpreter start and exit included).

    python benchmarks/startup.py             # the full job, 3 cold/warm pairs
    python benchmarks/startup.py --quick     # the job's --quick, 1 pair
    python benchmarks/startup.py --job-args "--meta-steps 100"   # other arguments for the job
    python benchmarks/startup.py --baseline ../old-checkout          # interleaved with another checkout
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # the child's clock starts here, before jax is imported

import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
JOB = ROOT / "examples" / "linear_toy.py"
PHASE_ORDER = ["import", "setup", "sampling", "training", "type-II ML", "evaluation", "report", "plotting"]
BACKEND = "/jax/core/compile/backend_compile_duration"
TRACE = "/jax/core/compile/jaxpr_trace_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
HIT = "/jax/compilation_cache/cache_hits"


# ---------------------------------------------------------------------------- the child process


def child(result_path: str, root: str, job_args: list[str]) -> None:
    """Run the job of the checkout at ``root`` in this process, counting compiles per phase; write the
    record to ``result_path``."""
    import jax.monitoring

    events = []  # (perf_counter at the end of the event, name, seconds)
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration_secs, **kw: events.append((time.perf_counter(), event, float(duration_secs))))
    jax.monitoring.register_event_listener(lambda event, **kw: events.append((time.perf_counter(), event, 0.0)))
    sys.path.insert(0, root)
    sys.path.insert(0, os.path.join(root, "examples"))
    import linear_toy  # noqa: E402 (the job's module: jax, hiermeta, models, ...)

    t_imported = time.perf_counter()
    linear_toy.main(job_args)
    t_end = time.perf_counter()
    spans = [("import", _T0, t_imported)] + [tuple(p) for p in linear_toy.PHASES]
    phases = {}
    for name, start, end in spans:
        entry = phases.setdefault(name, {"seconds": 0.0, "compiles": 0, "cache_hits": 0, "compile_s": 0.0,
                                         "trace_s": 0.0, "lower_s": 0.0})
        entry["seconds"] += end - start
        for t, event, secs in events:
            if not start <= t <= end:
                continue
            if event == BACKEND:
                entry["compiles"] += 1
                entry["compile_s"] += secs
            elif event == HIT:
                entry["cache_hits"] += 1
            elif event == TRACE:
                entry["trace_s"] += secs
            elif event == LOWER:
                entry["lower_s"] += secs
    for entry in phases.values():
        entry["compiles"] -= entry["cache_hits"]  # requests the cache served are not XLA compilations
    total = {"seconds": t_end - _T0, "compiles": sum(e == BACKEND for _, e, _ in events) - sum(e == HIT for _, e, _ in events),
             "cache_hits": sum(e == HIT for _, e, _ in events)}
    Path(result_path).write_text(json.dumps({"phases": phases, "total": total}))


# ---------------------------------------------------------------------------- the parent


def run_once(cache_dir: str, job_args: list[str], out_dir: str, root: Path = ROOT) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir)
    env.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", result_path, str(root), "--", *job_args,
           "--out", out_dir]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=str(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        print(done.stdout[-4000:])
        raise SystemExit(f"the job failed (exit {done.returncode}): {' '.join(cmd)}")
    record = json.loads(Path(result_path).read_text())
    os.unlink(result_path)
    record["process_seconds"] = wall
    return record


def summarise(runs: list[dict]) -> dict:
    """Median over runs of every phase's figures."""
    names = [n for n in PHASE_ORDER if any(n in r["phases"] for r in runs)]
    names += sorted({n for r in runs for n in r["phases"]} - set(names))
    med = lambda xs: statistics.median(xs) if xs else 0.0
    out = {}
    for name in names:
        entries = [r["phases"].get(name, {}) for r in runs]
        out[name] = {k: med([e.get(k, 0) for e in entries])
                     for k in ("seconds", "compiles", "cache_hits", "compile_s", "trace_s", "lower_s")}
    out["total (in process)"] = {"seconds": med([r["total"]["seconds"] for r in runs]),
                                 "compiles": med([r["total"]["compiles"] for r in runs]),
                                 "cache_hits": med([r["total"]["cache_hits"] for r in runs]),
                                 "compile_s": med([sum(e.get("compile_s", 0) for e in r["phases"].values()) for r in runs]),
                                 "trace_s": med([sum(e.get("trace_s", 0) for e in r["phases"].values()) for r in runs]),
                                 "lower_s": med([sum(e.get("lower_s", 0) for e in r["phases"].values()) for r in runs])}
    out["process"] = {"seconds": med([r["process_seconds"] for r in runs])}
    return out


def main() -> None:
    from common import format_table, parser, write_results

    p = parser(__doc__)
    p.add_argument("--job-args", default=None, help="arguments for examples/linear_toy.py (default: none; quick: --quick)")
    p.add_argument("--baseline", default=None,
                   help="another checkout (e.g. an older commit) whose job runs interleaved with this one's, "
                        "each cold/warm pair of it right after this checkout's")
    args = p.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    job_args = shlex.split(args.job_args) if args.job_args is not None else (["--quick"] if args.quick else [])
    roots = {"this checkout": ROOT}
    if args.baseline:
        roots["baseline"] = Path(args.baseline).resolve()
    runs = {label: {"cold": [], "warm": []} for label in roots}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(repeats):
            for label, root in roots.items():
                cache = tempfile.mkdtemp(dir=scratch, prefix="cache")
                for kind in ("cold", "warm"):
                    record = run_once(cache, job_args, os.path.join(scratch, "out"), root)
                    runs[label][kind].append(record)
                    print(f"  pair {r + 1}/{repeats} {label} {kind}: {record['process_seconds']:.1f} s, "
                          f"{record['total']['compiles']} compiles", flush=True)
    summary = {label: {kind: summarise(rs) for kind, rs in kinds.items()} for label, kinds in runs.items()}
    for label in roots:
        rows = []
        for name in summary[label]["cold"]:
            c, w = summary[label]["cold"][name], summary[label]["warm"].get(name, {})
            rows.append([name, c["seconds"], c.get("compiles", ""), c.get("compile_s", ""), c.get("trace_s", ""),
                         w.get("seconds", ""), w.get("compiles", ""), w.get("cache_hits", "")])
        print(f"\n{label} ({roots[label]}): examples/linear_toy.py {' '.join(job_args)}: "
              f"medians of {repeats} cold/warm pairs (seconds)")
        print(format_table(["phase", "cold s", "cold compiles", "XLA s", "trace s", "warm s", "warm compiles",
                            "warm cache hits"], rows, 2))
    if args.baseline:
        print("\nratios baseline / this checkout, median over pairs of the ratio within a pair (process seconds)")
        for kind in ("cold", "warm"):
            ratios = [b["process_seconds"] / a["process_seconds"]
                      for a, b in zip(runs["this checkout"][kind], runs["baseline"][kind])]
            print(f"  {kind}: {statistics.median(ratios):.2f}x")
    write_results(args, "startup", {"job": ["examples/linear_toy.py", *job_args], "repeats": repeats,
                                    "roots": {k: str(v) for k, v in roots.items()}, "summary": summary, "runs": runs})


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--child":
        rest = sys.argv[4:]
        child(sys.argv[2], sys.argv[3], rest[1:] if rest[:1] == ["--"] else rest)
    else:
        sys.path.insert(0, str(HERE))
        main()
