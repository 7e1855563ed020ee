"""Run every benchmark in turn (each in its own process) and print their tables.

    python benchmarks/run_all.py            # the full figures (tens of minutes on 2 cores)
    python benchmarks/run_all.py --quick    # a smoke run of each

Extra arguments are passed to every script (e.g. ``--out DIR``).  Set
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`` to run with single-threaded Eigen, as the
recorded figures were (docs/performance.md).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["sinusoid_maml.py", "learners.py", "memory.py", "nuts.py", "nuts_time.py", "devices.py", "startup.py",
           "type2_scale.py"]


def main():
    failed = []
    for script in SCRIPTS:
        print(f"\n######## {script} {' '.join(sys.argv[1:])}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, str(HERE / script), *sys.argv[1:]])
        print(f"######## {script}: exit {code}, {time.perf_counter() - t0:.0f} s", flush=True)
        if code:
            failed.append(script)
    if failed:
        raise SystemExit(f"failed: {failed}")


if __name__ == "__main__":
    main()
