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


# ---------------------------------------------------------------------------- absurd values (issue 22)

def _options(name):
    parser = load(name).build_parser()
    return parser, [a for a in parser._actions if a.option_strings and a.dest != "help"]


def _refused(parser, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        parser.parse_args(argv)
    assert info.value.code == 2, argv
    return capsys.readouterr().err


@pytest.mark.parametrize("name", NAMES)
def test_every_count_seed_and_probability_refuses_absurd_values_with_a_message(name, capsys):
    """Counts past any study's reach (1e23 meta-steps ran, a 1e11 batch hung, 1e11 chains were cut to
    2 by --quick), seeds past 32 bits (an OverflowError traceback), NaN probabilities: each refused
    by argparse with the option's name; no option takes a bare int or float."""
    parser, options = _options(name)
    assert not [a.option_strings[0] for a in options if a.type in (int, float)], name
    huge = "100000000000000000000000"
    for action in options:
        option, kind = action.option_strings[0], getattr(action.type, "__name__", "")
        if kind.startswith("integer in"):
            err = _refused(parser, [option, huge], capsys)
            assert f"{option}: must be <= " in err and f"got {huge}" in err, err
            assert f"{option}: must be >= " in _refused(parser, [option, "-1"], capsys)
        elif kind == "prng_seed":
            err = _refused(parser, [option, "99999999999999999999999"], capsys)
            assert f"{option}: must be an integer in [0, 4294967295], got 99999999999999999999999" in err, err
        elif kind in ("positive_float", "probability"):
            for bad in ("nan", "inf", "-1", "x"):
                assert option in _refused(parser, [option, bad], capsys)
    if any(a.dest == "chains" for a in options):
        assert "--chains: must be <= 1024 " in _refused(parser, ["--chains", "100000000000"], capsys)


def test_quick_fills_in_defaults_but_keeps_what_is_given():
    parse = load("sleepstudy").parse_args
    assert (parse([]).chains, parse([]).warmup, parse([]).samples) == (4, 1000, 1000)
    assert (parse(["--quick"]).chains, parse(["--quick"]).samples) == (2, 300)
    given = parse(["--quick", "--chains", "8", "--samples", "50"])
    assert (given.chains, given.samples, given.warmup) == (8, 50, 300)


def test_an_existing_checkpoint_needs_resume_or_overwrite(tmp_path, capsys):
    existing = tmp_path / "run.npz"
    existing.write_bytes(b"a finished run")
    parse = load("sinusoid").parse_args
    with pytest.raises(SystemExit):
        parse(["--checkpoint", str(existing)])
    assert f"--checkpoint {existing} already exists: add --resume" in capsys.readouterr().err
    assert parse(["--checkpoint", str(existing), "--resume"]).resume
    assert parse(["--checkpoint", str(existing), "--overwrite"]).overwrite
    with pytest.raises(SystemExit):
        parse(["--checkpoint", str(existing), "--resume", "--overwrite"])
    fewshot = load("fewshot").parse_args
    with pytest.raises(SystemExit):
        fewshot(["--checkpoint-dir", str(tmp_path)])
    assert "already holds checkpoints (run.npz): add --resume" in capsys.readouterr().err
    assert fewshot(["--checkpoint-dir", str(tmp_path), "--overwrite"]).overwrite
