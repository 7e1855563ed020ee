"""The ``hiermeta`` command line: mixed models from a data file and an lme4 formula.

    hiermeta fit sleepstudy.csv "Reaction ~ Days + (Days | Subject)"             # REML, prints the summary
    hiermeta fit sleepstudy.csv "Reaction ~ Days + (Days | Subject)" --method ML --json fit.json
    hiermeta fit cbpp.csv "cbind(incidence, size - incidence) ~ C(period) + (1 | herd)" --family binomial
    python -m hiermeta fit ...                                                     # the same

Reads CSV (``.csv``, ``.tsv``, ``.txt``; ``-`` for standard input) and parquet (pandas, with
pyarrow or fastparquet installed).  Bad input (a missing file, an unknown column, a formula
error, a data defect) ends with exit status 2 and one line on standard error, no traceback
(``--traceback`` shows it); a warning (a singular fit, dropped columns) is one line each on
standard error and the fit goes on.  ``--json`` writes every estimate with its name
(:meth:`hiermeta.mixed.MixedFit.to_dict`) and refuses to overwrite a file unless ``--force``.

Subcommands: ``fit`` (here) and those listed in :data:`COMMAND_MODULES`, each a module with
``add_parser(subparsers)`` that registers its parser and sets ``run=`` (a function of the parsed
arguments returning the exit status).  Nothing here imports JAX.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser", "read_table", "COMMAND_MODULES", "CommandError"]

# modules adding subcommands (each with add_parser(subparsers)); a missing one is skipped
COMMAND_MODULES = ("hiermeta.cli_compare",)

EXIT_BAD_INPUT = 2


class CommandError(Exception):
    """Bad input to a command: reported as one line, exit status 2."""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def read_table(path: str):
    """A data frame from a CSV/TSV file (``-``: standard input) or a parquet file."""
    import pandas as pd

    if path == "-":
        return pd.read_csv(sys.stdin)
    p = Path(path)
    if not p.exists():
        raise CommandError(f"no such file: {path}")
    suffix = p.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(p)
        if suffix in (".tsv", ".tab"):
            return pd.read_csv(p, sep="\t")
        return pd.read_csv(p)
    except ImportError as err:
        raise CommandError(f"reading {path} needs a parquet engine: pip install pyarrow ({err})") from None
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise CommandError(f"cannot read {path}: {err}") from None


def _add_fit(sub) -> None:
    p = sub.add_parser(
        "fit", formatter_class=_Formatter,
        help="fit a mixed model to a data file and print lme4's summary",
        description="Fit a mixed model given by an lme4 formula to a CSV or parquet file; print lme4's summary "
                    "and optionally write every estimate as JSON.",
        epilog='example: hiermeta fit sleepstudy.csv "Reaction ~ Days + (Days | Subject)" --json fit.json')
    p.add_argument("data", help="the data: a .csv/.tsv file ('-' for standard input) or a .parquet file")
    p.add_argument("formula", help="lme4 formula, e.g. 'y ~ x + (x | g)', '(1 | a/b)', '(1 | g1) + (1 | g2)', '(x || g)'")
    p.add_argument("--family", choices=["gaussian", "binomial", "poisson"], default="gaussian",
                   help="the response's family")
    p.add_argument("--link", choices=["logit", "probit", "cloglog", "log", "identity"], default=None,
                   help="the family's link (default: its canonical one)")
    p.add_argument("--method", choices=["REML", "ML"], default=None,
                   help="Gaussian: REML or ML (default REML, as lme4); other families: ML")
    p.add_argument("--approximation", choices=["laplace", "agq"], default=None,
                   help="GLMM integral: Laplace (default) or adaptive Gauss-Hermite quadrature (one scalar term)")
    p.add_argument("--nodes", type=int, default=None, help="quadrature nodes with --approximation agq")
    p.add_argument("--weights", default=None, help="a column of prior weights")
    p.add_argument("--rank-deficient", choices=["drop", "error"], default="drop",
                   help="dependent fixed-effect columns: drop them with a warning (lme4) or stop")
    p.add_argument("--json", dest="json_path", default=None, help="write every estimate (with names) to this JSON file")
    p.add_argument("--force", action="store_true", help="overwrite the --json file if it exists")
    p.add_argument("--no-ranef", action="store_true", help="leave the conditional modes out of the JSON")
    p.add_argument("--quiet", action="store_true", help="do not print the summary")
    p.set_defaults(run=run_fit)


def run_fit(args) -> int:
    """``hiermeta fit``: read, build, fit, print, write."""
    from .mixed import mixed_model

    started = time.perf_counter()
    if args.json_path and Path(args.json_path).exists() and not args.force:
        raise CommandError(f"{args.json_path} exists; pass --force to overwrite it")
    if args.nodes is not None and args.approximation != "agq":
        raise CommandError("--nodes applies to --approximation agq")
    data = read_table(args.data)
    read_seconds = time.perf_counter() - started
    name = "stdin" if args.data == "-" else Path(args.data).name
    model = mixed_model(args.formula, data, family=args.family, weights=args.weights, link=args.link,
                        rank_deficient=args.rank_deficient, data_name=name)
    fit = model.fit(method=args.method, approximation=args.approximation, nodes=args.nodes)
    if not args.quiet:
        print(fit.summary())
    if args.json_path:
        out = fit.to_dict(ranef=not args.no_ranef)
        out["timings"]["read_seconds"] = read_seconds
        out["timings"]["total_seconds"] = time.perf_counter() - started
        out["command"] = ["hiermeta", "fit", args.data, args.formula] + \
            [f"--{k}={v}" for k, v in (("family", args.family), ("link", args.link), ("method", args.method)) if v]
        path = Path(args.json_path)
        mode = "w" if args.force else "x"
        try:
            with open(path, mode) as fh:
                json.dump(out, fh, indent=2)
        except FileExistsError:
            raise CommandError(f"{args.json_path} exists; pass --force to overwrite it") from None
        except OSError as err:
            raise CommandError(f"cannot write {args.json_path}: {err}") from None
        if not args.quiet:
            print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hiermeta", formatter_class=_Formatter,
        description="hiermeta on the command line: mixed models in lme4's language from a data file.")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_fit(sub)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        module.add_parser(sub)
    return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    previous = warnings.showwarning
    warnings.showwarning = _one_line_warnings
    try:
        return int(args.run(args) or 0)
    except (CommandError, ValueError, KeyError, NotImplementedError) as err:
        if args.traceback:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"hiermeta {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
