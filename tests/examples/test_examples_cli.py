"""The studies' command lines and outputs, as a newcomer meets them: every option documented with
its default, bad values refused by argparse with a message, and ``examples/NAME.py`` writing
``DIR/NAME.json`` and ``DIR/NAME.png`` (the sinusoid run end to end, tiny; the main job too, in
the slow set: it compiles three learners and type-II ML)."""

import json

import numpy as np
import pytest
from _examples import EXAMPLES, load_example as load

NAMES = sorted(p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith("_"))  # _name: shared by studies




@pytest.mark.parametrize("name", NAMES)
def test_every_option_has_help_and_shows_its_default(name):
    parser = load(name).build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    undocumented = [a.option_strings[0] for a in options if not a.help]
    assert not undocumented, f"{name}: options without help: {undocumented}"
    text = parser.format_help()
    for action in options:
        if action.default not in (None, False):
            assert f"(default: {action.default})" in " ".join(text.split()), (name, action.option_strings)
    assert parser.get_default("out") == "results"
    assert f"{name}.json" in " ".join(text.split())  # --out's help names the file the study writes


@pytest.mark.parametrize("argv, message", [
    (["--test-tasks", "0"], "--test-tasks: must be >= 2, got 0"),
    (["--test-tasks", "-5"], "--test-tasks: must be >= 2, got -5"),
    (["--meta-steps", "0"], "--meta-steps: must be >= 1, got 0"),
    (["--meta-steps", "2.5"], "--meta-steps: expected an integer, got '2.5'"),
    (["--inner-lr", "0"], "--inner-lr: must be a finite number > 0"),
    (["--type2-tasks", "-1"], "--type2-tasks: must be >= 1"),
])
def test_linear_toy_refuses_bad_counts_on_the_command_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        load("linear_toy").parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_zero_is_not_replaced_by_a_default():
    args = load("map_vs_posterior").parse_args(["--warmup", "0", "--tasks", "8,16"])
    assert args.warmup == 0 and args.tasks == [8, 16]


def test_linear_toy_quick_says_its_sigmas_have_not_converged():
    verdict = load("linear_toy").sigma_verdict
    quick = verdict(True, 300, ["Shrinkage", "M-Shrinkage"], 5.39, 6.21)
    assert "have NOT converged" in quick and "Exact targets" not in quick
    full = verdict(False, 3000, ["Shrinkage"], 5.39, 6.21)
    assert full.startswith("Exact targets") and "5.39" in full and "may not have converged" not in full
    assert "may not have converged" in verdict(False, 500, ["Shrinkage"], 5.39, 6.21)


@pytest.mark.slow
def test_linear_toy_end_to_end_writes_its_json_and_figure(tmp_path, capsys):
    payload = load("linear_toy").main(["--quick", "--meta-steps", "4", "--batch-size", "5", "--inner-steps", "5",
                                       "--test-tasks", "6", "--test-steps", "5", "--type2-tasks", "20",
                                       "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear_toy.json", "linear_toy.png"]
    saved = json.loads((tmp_path / "linear_toy.json").read_text())
    assert saved["schema"] == "hiermeta/linear_toy/v1" and saved["config"]["meta_steps"] == 4
    assert len(saved["methods"]["M-Shrinkage"]["curve"]["mean"]) == 6
    assert np.isfinite(payload["references"]["oracle"]["held_out"])
    printed = capsys.readouterr().out
    assert "have NOT converged" in printed and "Exact targets" not in printed


def test_sinusoid_end_to_end_writes_its_json_and_figure(tmp_path):
    load("sinusoid").main(["--meta-steps", "3", "--batch-size", "5", "--test-tasks", "5", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sinusoid.json", "sinusoid.png"]
    saved = json.loads((tmp_path / "sinusoid.json").read_text())
    assert saved["schema"] == "hiermeta/sinusoid/v1" and len(saved["history"]["sigma"]) == 3
