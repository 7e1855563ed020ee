"""The standardised scale is an exact reparametrisation (the criterion on it against the dense
likelihood of the raw design: tests/unit/mixed/test_lmm.py)."""

import numpy as np

from hiermeta.mixed.scaling import standardize
from hiermeta.mixed.terms import MixedDesign, make_term


def _design():
    rng = np.random.default_rng(0)
    n = 60
    g = np.arange(n) % 6
    x = rng.uniform(400, 550, n)  # metres
    Z = np.column_stack([np.ones(n), x])
    t = make_term("g", g, Z, ["(Intercept)", "x"])
    X = np.column_stack([np.ones(n), x, rng.normal(size=n) * 1e-3])
    return MixedDesign(rng.normal(size=n), X, ("(Intercept)", "x", "z"), (t,), np.zeros(n), np.ones(n))


def test_round_trips_and_unit_columns():
    design = _design()
    std_design, s = standardize(design)
    assert np.allclose(std_design.X[:, 1:].std(axis=0), 1.0) and np.allclose(std_design.X[:, 1:].mean(axis=0), 0.0)
    np.testing.assert_allclose(std_design.X @ s.beta_s(np.array([1.0, 2.0, 3.0])), design.X @ [1.0, 2.0, 3.0])
    theta = np.array([0.7, 0.003, 0.001])
    np.testing.assert_allclose(s.theta(s.theta_s(theta)), theta, rtol=1e-12)
    np.testing.assert_allclose(np.exp(s.log_abs_det_A), abs(np.linalg.det(s.A)), rtol=1e-10)
