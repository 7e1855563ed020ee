"""The summaries the studies record for the docs (paired differences, z calibration, run-off flags),
each against the same quantity computed here another way."""

from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from _examples import load_example


def test_paired_differences_are_per_group_differences():
    sleepstudy = load_example("sleepstudy")
    rng = np.random.default_rng(0)
    ref = rng.normal(-5, 1, 12)
    other = ref + rng.normal(0, 0.3, 12)
    other[7] -= 4.0  # one group dominates
    other[3] = np.nan  # a group without query rows
    ref_with_gap = ref.copy()
    ref_with_gap[3] = np.nan
    report = SimpleNamespace(groups=[f"g{i}" for i in range(12)],
                             predictive={"EB posterior": {"per_group": ref_with_gap}, "plug-in": {"per_group": other}})
    (row,) = sleepstudy.paired_differences(report)
    d = np.delete(other - ref, 3)
    assert row["num_groups"] == 11 and row["method"] == "plug-in" and row["minus"] == "EB posterior"
    assert row["mean"] == pytest.approx(np.nanmean(other) - np.nanmean(ref_with_gap), abs=1e-12)  # the log scores' difference
    assert row["sem"] == pytest.approx(np.std(d, ddof=1) / np.sqrt(11), rel=1e-12)
    assert row["median"] == pytest.approx(np.median(d), rel=1e-12)
    assert row["largest_group"] == "g7"
    assert row["largest_contribution"] == pytest.approx(d[6] / 11, rel=1e-12)
    assert row["mean_without_largest"] == pytest.approx(np.delete(d, 6).mean(), rel=1e-12)
    assert row["largest_contribution"] + row["mean_without_largest"] * 10 / 11 == pytest.approx(row["mean"], rel=1e-12)


def test_z_calibration_counts_scores_and_uses_the_bonferroni_bound():
    eight_schools = load_example("eight_schools")
    z = {"mu": (0.5, -2.5), "tau": (3.6, 0.1), "theta[A]": (-1.0, 2.2)}
    rows = [[f"{k} (non-centred)", 0, 0, 0, m, 0, 0, s, 100, "1.000"] for k, (m, s) in z.items()]
    rows.append(["tau (centred)", 0, 0, 0, 9.0, 0, 0, 9.0, 100, "1.000"])  # another run: not counted
    c = eight_schools.z_calibration(rows, "non-centred")
    assert c["num_scores"] == 6 and c["num_above_2"] == 3
    assert c["max_abs_z"] == 3.6 and c["max_at"] == "tau"
    assert c["expected_above_2"] == pytest.approx(6 * 0.0455, abs=1e-4)
    assert c["bonferroni_bound"] == pytest.approx(stats.norm.isf(0.01 / 12), rel=1e-12)  # 2.87 for 6 scores
    assert c["within_bound"] is False and c["scores"]["mu sd"] == -2.5


def test_pll_spread_flags_a_collapsed_noise_sd_and_a_correlation_at_the_boundary():
    pll_spread = load_example("pll_spread")
    est = np.array([[30.0, 6.0, 25.0, 0.2],
                    [30.0, 6.0, 1e-30, 0.2],     # noise sd collapsed
                    [30.0, 6.0, 25.0, -1.0],     # correlation at -1
                    [1e32, 6.0, 25.0, 0.9995],   # sigma ran off, correlation at the boundary
                    [30.0, 6.0, 25.0, 0.99]])
    scale = [47.45, 8.89, 47.45]
    rows = pll_spread.spread_rows("one split", est, ["sigma Intercept", "sigma Days", "noise sd", "corr"], scale)
    runs_off = {r[1]: r[-1] for r in rows}
    assert runs_off == {"sigma Intercept": 1, "sigma Days": 0, "noise sd": 1, "corr": 2}
