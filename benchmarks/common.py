"""Shared benchmark machinery: timing, the machine record, tables and JSON.

Timing rules (every script follows them):

* compile time is measured apart (``jit(...).lower(...).compile()``), never inside a rate;
* a rate is measured over a block of calls long enough to dwarf timer overhead (``min_block``
  seconds), ending in ``block_until_ready``; blocks are repeated and the **median** reported;
* implementations compared in one table are measured round-robin (one block of each, then the
  next round), so a busy machine slows them alike, and each ratio is the median over rounds of
  the ratio within a round;
* each block records wall-clock time and the process's CPU time.  Wall time is the figure of
  merit on a quiet machine; CPU time (all threads of the process) does not count the time the
  process waits for a core, so on a shared machine its ratios are far steadier.  Run with one
  compute thread per process (``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``, one torch
  thread) and the two agree when the machine is quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from hiermeta.printing import format_table, to_jsonable  # noqa: E402

__all__ = ["parser", "machine", "Timer", "round_robin", "compile_seconds", "format_table", "write_results",
           "block", "note", "ratio", "set_torch_threads", "settle"]


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer and shorter repeats (a smoke run)")
    p.add_argument("--repeats", type=int, help="timed blocks per implementation (default 7, quick 3)")
    p.add_argument("--min-block", type=float, help="seconds per timed block (default 1.0, quick 0.3)")
    p.add_argument("--out", default=str(ROOT / "results" / "benchmarks"), help="directory for the JSON")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads (default 1: its fastest setting for these tiny ops here)")
    return p


def settle(args) -> argparse.Namespace:
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.min_block = args.min_block or (0.3 if args.quick else 1.0)
    set_torch_threads(args.torch_threads)
    return args


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": load,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "x64": bool(jax.config.jax_enable_x64),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def block(tree):
    """Wait for every array of a JAX pytree."""
    return jax.block_until_ready(tree)


def note(message: str) -> None:
    print(f"note: {message}", flush=True)


class Timer:
    """A named implementation to time: ``run(n)`` performs ``n`` calls and waits for the result."""

    def __init__(self, name: str, run: Callable[[int], None], calls_per_second_hint: float | None = None):
        self.name = name
        self.run = run
        self.n = None
        self.blocks: list[float] = []  # wall seconds per call, one entry per block
        self.cpu_blocks: list[float] = []  # process CPU seconds per call

    def calibrate(self, min_block: float) -> None:
        n = 1
        while True:
            t0 = time.perf_counter()
            self.run(n)
            dt = time.perf_counter() - t0
            if dt >= min_block / 4 or n >= 1 << 20:
                self.n = max(1, int(np.ceil(n * min_block / max(dt, 1e-9))))
                return
            n *= 4

    def time_block(self) -> float:
        c0, t0 = time.process_time(), time.perf_counter()
        self.run(self.n)
        per_call = (time.perf_counter() - t0) / self.n
        self.cpu_blocks.append((time.process_time() - c0) / self.n)
        self.blocks.append(per_call)
        return per_call

    @property
    def median(self) -> float:
        return statistics.median(self.blocks)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_blocks)


def round_robin(timers: list[Timer], repeats: int, min_block: float, verbose: bool = True) -> None:
    """Calibrate, then time one block of each implementation per round, ``repeats`` rounds."""
    for t in timers:
        t.calibrate(min_block)
        t.run(1)  # one more warm call after calibration
    for r in range(repeats):
        for t in timers:
            t.time_block()
        if verbose:
            print(f"  round {r + 1}/{repeats}: " + ", ".join(f"{t.name} {t.blocks[-1] * 1e3:.2f} ms" for t in timers),
                  flush=True)


def ratio(num: Timer, den: Timer, cpu: bool = False) -> float:
    """Median over rounds of ``num / den`` measured in the same round (wall or CPU time)."""
    a, b = (num.cpu_blocks, den.cpu_blocks) if cpu else (num.blocks, den.blocks)
    return statistics.median(x / y for x, y in zip(a, b))


def set_torch_threads(n: int) -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(n)


def compile_seconds(fn, *args, static_argnums=()) -> tuple[float, Callable]:
    """Trace + lower + compile ``jit(fn)`` for ``args``; returns (seconds, compiled callable)."""
    jitted = jax.jit(fn, static_argnums=static_argnums)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return time.perf_counter() - t0, compiled


def write_results(args, name: str, payload: dict) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    script = Path(sys.argv[0]).resolve()
    script = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    payload = {"benchmark": name, "command": " ".join(["python", str(script)] + sys.argv[1:]),
               "quick": bool(getattr(args, "quick", False)), "machine": machine(), **payload}
    path.write_text(json.dumps(to_jsonable(payload), indent=1) + "\n")
    print(f"wrote {path}")
    return path
