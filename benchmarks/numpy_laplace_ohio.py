"""A plain NumPy/SciPy Laplace fit of ohio's random-slope logistic GLMM, the reference of issue 21.

``glmer(resp ~ age + smoke + (age | id), ohio, binomial)`` (537 children, 4 visits each) written
directly for this model: each child's conditional mode by damped Newton with its 2 x 2 Hessian in
closed form (warm-started from the last modes, to a step below 1e-10, the Hessian then recomputed
at the mode), ``-2 log L`` summed over children, L-BFGS-B with forward-difference gradients over
the lower factor ``l`` of the 2 x 2 covariance (``Sigma = l l'``) and the fixed effects.  Independent
of hiermeta: ``benchmarks/mixed_fit.py`` times it beside ``hiermeta.mixed``, mixedlm and the JAX
engine, and ``tests/claims/test_glmm_lme4.py`` checks hiermeta's fit against it.

    python benchmarks/numpy_laplace_ohio.py ohio.csv     # prints -2 log L, l and beta
"""

from __future__ import annotations

import sys

import numpy as np
from scipy import optimize
from scipy.special import expit, log_expit


def fit(df) -> tuple:
    """``(-2 log L, (l11, l21, l22), beta)`` for a data frame with columns resp, id, age, smoke."""
    df = df.sort_values(["id", "age"])
    L = df["id"].nunique()
    y, age, smoke = (df[c].to_numpy(float).reshape(L, -1) for c in ("resp", "age", "smoke"))
    state = {"u": np.zeros((L, 2))}

    def criterion(par):
        l11, l21, l22, b0, b1, b2 = par
        fixed = b0 + b1 * age + b2 * smoke
        z1, z2 = l11 + l21 * age, l22 * age  # the child's (1, age) times the lower factor

        def pdev(u):
            eta = fixed + z1 * u[:, :1] + z2 * u[:, 1:]
            return -2 * (y * log_expit(eta) + (1 - y) * log_expit(-eta)).sum(1) + (u * u).sum(1), eta

        u = state["u"].copy()
        dev, eta = pdev(u)
        for _ in range(100):
            mu = expit(eta)
            w, r = mu * (1 - mu), mu - y
            g1, g2 = (z1 * r).sum(1) + u[:, 0], (z2 * r).sum(1) + u[:, 1]
            h11, h12, h22 = (w * z1 * z1).sum(1) + 1, (w * z1 * z2).sum(1), (w * z2 * z2).sum(1) + 1
            det = h11 * h22 - h12 * h12
            step = np.stack([(h22 * g1 - h12 * g2) / det, (h11 * g2 - h12 * g1) / det], 1)
            t = np.ones(L)
            for _ in range(30):  # halve the step of each child whose penalised deviance went up
                new, eta_new = pdev(u - t[:, None] * step)
                worse = new > dev + 1e-12 * (1 + np.abs(dev))
                if not worse.any():
                    break
                t[worse] /= 2
            u, dev, eta = u - t[:, None] * step, new, eta_new
            if np.abs(t[:, None] * step).max() < 1e-10:
                break
        mu = expit(eta)
        w = mu * (1 - mu)
        h11, h12, h22 = (w * z1 * z1).sum(1) + 1, (w * z1 * z2).sum(1), (w * z2 * z2).sum(1) + 1
        state["u"] = u
        return dev.sum() + np.log(h11 * h22 - h12 * h12).sum()

    res = optimize.minimize(criterion, [1.0, 0.0, 1.0, 0.0, 0.0, 0.0], method="L-BFGS-B",
                            bounds=[(0, None), (None, None), (0, None)] + [(None, None)] * 3)
    return float(res.fun), res.x[:3], res.x[3:]


if __name__ == "__main__":
    import pandas as pd

    deviance, factor, beta = fit(pd.read_csv(sys.argv[1]))
    print(f"-2 log L {deviance:.8f}  l {np.round(factor, 6)}  beta {np.round(beta, 6)}")
