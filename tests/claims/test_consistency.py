"""The estimators of examples/consistency.py against closed forms on the 1-D toy (Appendix B)."""

import jax
import numpy as np
import pytest
from _examples import load_example
from scipy.optimize import brentq

from hiermeta.models import linear

consistency = load_example("consistency")


def test_expected_joint_map_gradient_root_is_eq10_in_one_dimension():
    for s2 in (2.25, 1.0, 5.0):
        domain = consistency.toy_domain(s2)
        root = np.exp(brentq(lambda r: linear.expected_joint_map_gradient(domain, np.exp(0.5 * r))[0],
                             np.log(0.5 * s2), np.log(s2)))
        eq10 = (s2 - 0.2 + np.sqrt((s2 + 0.2) * (s2 - 0.6))) / 2
        assert root == pytest.approx(eq10, rel=1e-10)
        assert consistency.asymptotic_joint_map(domain)[0] ** 2 == pytest.approx(eq10, rel=1e-12)
    assert consistency.asymptotic_joint_map(consistency.toy_domain(0.4))[0] == 0.0  # s2 < 3/N: collapse


def test_estimators_match_closed_forms_on_the_toy():
    model = linear.make_model(1)
    objectives = consistency.make_objectives(model)
    name, solver = consistency.exact_solver()
    exact = objectives["hypergradient"](solver) if solver is not None else None
    for s2, seed in ((2.25, 0), (0.4, 1)):
        _, batch = linear.sample_tasks(consistency.toy_domain(s2), jax.random.PRNGKey(seed), 2000)
        est, checks = consistency.estimate(model, objectives, batch, exact)
        if exact is not None:  # the library's exact implicit hypergradient is the gradient of the PLL
            assert checks["exact_hypergradient_max_abs_diff"] < 1e-8
        ml, joint = consistency.toy_closed_forms(batch, 5)
        assert est["(iii) type-II ML"][0] == pytest.approx(ml, rel=1e-5)
        assert est["(iv) joint MAP"][0] == pytest.approx(joint, rel=1e-6, abs=1e-12)
        # in 1-D the exact PLL gradient is Eq. 4's times 1 / (1 + N sigma^2): one root
        assert est["(i) PLL, Eq. 4"][0] == pytest.approx(est["(ii) PLL, exact"][0], rel=1e-6)
        assert est["(ii) PLL, exact"][0] ** 2 == pytest.approx(s2, rel=0.2)  # 2000 tasks: within sampling error
    assert joint == 0.0  # s2 = 0.4 < 3/N: joint MAP collapses
