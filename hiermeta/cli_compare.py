"""``hiermeta compare``: MAP plug-in vs empirical-Bayes posterior vs NUTS on held-out rows, from a data file.

    hiermeta compare ohio.csv "resp ~ age + smoke + (1 | id)" --family binomial --holdout last:1 --order age
    hiermeta compare sleepstudy.csv "Reaction ~ Days + (Days | Subject)" --holdout last:3 --order Days \\
        --chains 4 --samples 1000 --json cmp.json --figure cmp.png
    hiermeta compare cbpp.csv "cbind(incidence, size - incidence) ~ period + (1 | herd)" --family binomial \\
        --holdout fraction:0.25 --no-nuts

Splits the rows (``--holdout last:K`` with ``--order COLUMN``: the last ``K`` rows of every group
by that column, each group keeping one training row at least; ``--holdout fraction:F``: a random
fraction, ``--seed``), fits the model on the training rows (:func:`hiermeta.mixed_model`), runs
NUTS on the same model started from the fit (:func:`hiermeta.mixed.numpyro_model.mixed_nuts`;
``--no-nuts`` skips it), and prints the comparison (:func:`hiermeta.mixed.comparison.compare`): the
held-out scores of the three methods with paired differences, hyperparameters, the approximation
check and the groups that moved most.  ``--json`` and ``--figure`` write the report.  Groups:
``--group`` (default: the first random-effect term's grouping factor).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

__all__ = ["add_parser", "run_compare", "parse_holdout"]


def parse_holdout(text: str) -> dict:
    """``"last:K"`` -> ``{"last": K}``; ``"fraction:F"`` -> ``{"fraction": F}``."""
    from .cli import CommandError

    kind, _, value = str(text).partition(":")
    try:
        if kind == "last":
            k = int(value)
            if k < 1:
                raise ValueError
            return {"last": k}
        if kind == "fraction":
            f = float(value)
            if not 0.0 < f < 1.0:
                raise ValueError
            return {"fraction": f}
    except ValueError:
        pass
    raise CommandError(f"--holdout must be last:K (K >= 1, with --order) or fraction:F (0 < F < 1), got {text!r}")


def add_parser(sub) -> None:
    from .cli import _Formatter

    p = sub.add_parser(
        "compare", formatter_class=_Formatter,
        help="MAP plug-in vs EB posterior vs NUTS on held-out rows of a mixed model",
        description=__doc__.split("\n\n", 1)[1], epilog="the report's JSON schema: hiermeta/mixed-compare/v1")
    p.add_argument("data", help="the data: a .csv/.tsv file ('-' for standard input) or a .parquet file")
    p.add_argument("formula", help="lme4 formula, e.g. 'y ~ x + (x | g)'")
    p.add_argument("--family", choices=["gaussian", "binomial", "poisson"], default="gaussian")
    p.add_argument("--link", choices=["logit", "probit", "cloglog", "log", "identity"], default=None,
                   help="the family's link (default: its canonical one)")
    p.add_argument("--holdout", required=True, help="last:K (with --order) or fraction:F")
    p.add_argument("--order", default=None, help="the column ordering the rows within a group (for last:K)")
    p.add_argument("--group", default=None,
                   help="the grouping column(s) of the split and the scores, comma-separated (default: the first "
                        "random-effect term's grouping factor)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the draws and the randomised PIT")
    p.add_argument("--approximation", choices=["laplace", "agq"], default=None, help="the GLMM fit's integral")
    p.add_argument("--eb", choices=["auto", "exact", "quadrature", "importance", "laplace"], default="auto",
                   help="how the EB posterior of the random effects is computed")
    p.add_argument("--draws", type=int, default=2000, help="Monte Carlo draws of the EB posterior")
    p.add_argument("--no-check", action="store_true", help="skip the approximation checks (AGQ refit, importance sampling)")
    p.add_argument("--no-nuts", action="store_true", help="skip NUTS")
    p.add_argument("--warmup", type=int, default=1000, help="NUTS warm-up iterations per chain")
    p.add_argument("--samples", type=int, default=1000, help="NUTS draws per chain")
    p.add_argument("--chains", type=int, default=4, help="NUTS chains")
    p.add_argument("--target-accept", type=float, default=0.8, help="NUTS target acceptance probability")
    p.add_argument("--no-progress", action="store_true", help="no NUTS progress bar")
    p.add_argument("--json", dest="json_path", default=None, help="write the report to this JSON file")
    p.add_argument("--figure", default=None, help="write the report's figure to this file (.png, .pdf, .svg)")
    p.add_argument("--force", action="store_true", help="overwrite the --json and --figure files")
    p.set_defaults(run=run_compare)


def run_compare(args) -> int:
    """Read, split, fit, NUTS, compare, print, write."""
    from .cli import CommandError, read_table
    from .mixed import mixed_model
    from .mixed.comparison import compare, holdout_split

    started = time.perf_counter()
    for path in (args.json_path, args.figure):
        if path and Path(path).exists() and not args.force:
            raise CommandError(f"{path} exists; pass --force to overwrite it")
    split = parse_holdout(args.holdout)
    if "last" in split and not args.order:
        raise CommandError("--holdout last:K needs --order COLUMN (the order of the rows within a group)")
    data = read_table(args.data)
    whole = mixed_model(args.formula, data, family=args.family, link=args.link)  # checks the formula and finds the groups
    group = args.group.split(",") if args.group else list(whole.frame.term_columns(0))
    missing = [g for g in group if g not in data.columns]
    if missing:
        raise CommandError(f"--group: no column(s) {missing} in {args.data}")
    train, heldout = holdout_split(data, group, order=args.order, seed=args.seed, **split)
    print(f"{len(train)} training rows, {len(heldout)} held out ({args.holdout} by {', '.join(group)})")
    fit = mixed_model(args.formula, train, family=args.family, link=args.link,
                      data_name=Path(args.data).name).fit(approximation=args.approximation)
    print(f"fit: {fit.method}, log-likelihood {fit.loglik:.3f} ({fit.fit_seconds:.1f}s)")
    nuts, nuts_seconds = None, None
    if not args.no_nuts:
        t0 = time.perf_counter()
        nuts = fit.nuts(key=args.seed, num_warmup=args.warmup, num_samples=args.samples, num_chains=args.chains,
                        target_accept=args.target_accept, progress_bar=not args.no_progress)
        nuts_seconds = time.perf_counter() - t0
    unit_term = next((k for k in range(len(fit.design.terms)) if list(fit.model.frame.term_columns(k)) == group), None)
    report = compare(fit, heldout, nuts, eb=args.eb, unit_term=unit_term, num_draws=args.draws, seed=args.seed,
                     check_approximation=not args.no_check)
    print(report.to_string())
    if args.json_path:
        out = report.to_dict()
        out["command"] = ["hiermeta", "compare", args.data, args.formula, f"--family={args.family}",
                          f"--holdout={args.holdout}"] + ([f"--order={args.order}"] if args.order else [])
        out["timings"] = {"fit_seconds": fit.fit_seconds, "nuts_seconds": nuts_seconds,
                          "total_seconds": time.perf_counter() - started}
        try:
            with open(args.json_path, "w" if args.force else "x") as fh:
                json.dump(out, fh, indent=2)
        except OSError as err:
            raise CommandError(f"cannot write {args.json_path}: {err}") from None
        print(f"wrote {args.json_path}")
    if args.figure:
        report.plot(args.figure)
        print(f"wrote {args.figure}")
    return 0
