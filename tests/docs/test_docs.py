"""The docs check on README.md and docs/*.md (conventions: docs/writing-docs.md), and tests that it
fails on a changed number, a dead link and a broken snippet."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docs_check as dc  # noqa: E402

PAGES = dc.doc_files()
IDS = [str(p.relative_to(dc.ROOT)) for p in PAGES]
# pages this suite checks but whose owner has yet to mark them up (docs/writing-docs.md): their
# numbers are expected failures (strict: remove the entry once they pass) and their Python blocks
# are not run, so that the check stays strict for every other page
NOT_YET = {
}


def pages(pending=None):
    pending = pending or {}
    return [pytest.param(p, id=i, marks=[pytest.mark.xfail(reason=pending[i], strict=True)] if i in pending else [])
            for p, i in zip(PAGES, IDS)]


def cache_dir() -> str:
    return os.environ.get("JAX_COMPILATION_CACHE_DIR", str(dc.ROOT / ".jax_cache"))


# ---------------------------------------------------------------------------- the real pages


@pytest.mark.parametrize("path", pages(NOT_YET))
def test_every_number_has_its_recorded_value(path):
    problems = dc.check_numbers(dc.parse(path))
    assert not problems, "\n".join(f"{w}: {m}" for w, m in problems)


@pytest.mark.parametrize("path", pages())
def test_every_link_resolves(path):
    problems = dc.check_links(dc.parse(path))
    assert not problems, "\n".join(f"{w}: {m}" for w, m in problems)


def all_snippets() -> tuple[list, list]:
    problems, out = [], []
    for path in PAGES:
        out += dc.snippets(dc.parse(path), problems)
    return out, problems


def test_every_python_block_is_run_or_says_why_not():
    snippets, problems = all_snippets()
    assert not problems, "\n".join(f"{w}: {m}" for w, m in problems)
    assert snippets, "no Python block found"


def pending(snippet) -> bool:
    """A block of a page still listed in NOT_YET (its owner makes its blocks run with its markers)."""
    return str(Path(snippet.page).relative_to(dc.ROOT)) in NOT_YET


@pytest.fixture(scope="module")
def default_run():
    snippets, _ = all_snippets()
    chosen = [s for s in snippets if s.mode == "default" and not pending(s)]
    return chosen, dc.run_snippets(chosen, cache=cache_dir())


def test_python_blocks_run(default_run):
    """Every Python block of the README and docs (quick settings, slow and no blocks excepted)."""
    chosen, results = default_run
    failed = {w: e for w, e in results.items() if e}
    assert not failed, "\n\n".join(f"{w}:\n{e}" for w, e in failed.items())
    assert set(results) == {s.where for s in chosen}


@pytest.mark.slow
def test_slow_python_blocks_run_as_written():
    """Pages holding a block marked ``run: slow``: every block, as written (no quick edits)."""
    snippets, _ = all_snippets()
    slow_pages = {s.page for s in snippets if s.mode == "slow"}
    if not slow_pages:
        pytest.skip("no block is marked run: slow")
    chosen = []
    for path in PAGES:
        if str(path) in slow_pages:
            page = dc.parse(path)
            for block, s in zip([b for b in page.blocks if b.kind == "code" and b.lang in dc.PYTHON],
                                dc.snippets(page)):
                if s.mode != "no":
                    chosen.append(dc.Snippet(s.where, s.page, block.text, s.mode))
    results = dc.run_snippets(chosen, timeout=3 * 3600, cache=cache_dir())
    failed = {w: e for w, e in results.items() if e}
    assert not failed, "\n\n".join(f"{w}:\n{e}" for w, e in failed.items())


# ---------------------------------------------------------------------------- the check itself


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A repository of one page and one recorded JSON."""
    monkeypatch.setattr(dc, "ROOT", tmp_path)
    dc._JSON_CACHE.clear()
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "study.json").write_text(json.dumps({
        "scores": {"plug-in": {"lpd": -5.74851, "sem": 0.84393, "coverage": 0.72222}, "n": 36},
        "sigma": [23.780567, 5.716835], "tiny": 1.4e-4, "huge": 1.452e32,
        "printed": "phi ~ Normal(loc=[253.5235, 9.6218])"}))
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n\ntext\n")
    return tmp_path


def page(site, text: str) -> dc.Page:
    path = site / "page.md"
    path.write_text(text)
    return dc.parse(path)


SOURCED = """# Study

<!-- numbers: docs/results/study.json scores; sigma -->
The plug-in scores -5.7485 +- 0.8439 per observation on 36 rows (72% inside its interval), sigma 23.78.

<!-- numbers: docs/results/study.json scores -->
```
method      lpd     sem  coverage_90
plug-in  -5.7485  0.8439       0.7222
```
"""


def test_recorded_numbers_pass(site):
    assert dc.check_numbers(page(site, SOURCED)) == []


@pytest.mark.parametrize("old, new, token", [
    ("-5.7485 +-", "-5.7484 +-", "-5.7484"), ("sigma 23.78", "sigma 23.79", "23.79"),
    ("sigma 23.78", "sigma -23.78", "-23.78"), ("0.8439       0.7222", "0.8439       0.7223", "0.7223"),
    ("on 36 rows", "on 35 rows", "35"), ("(72%", "(73%", "73%"), ("-5.7485  0.8439", "-5.7485  0.8493", "0.8493"),
])
def test_a_changed_number_fails(site, old, new, token):
    assert old in SOURCED
    problems = dc.check_numbers(page(site, SOURCED.replace(old, new)))
    assert any("no value under the marker's keys prints as" in m and token in m.split(": ", 1)[1].split(", ")
               for _, m in problems), problems


def test_a_number_without_a_source_fails(site):
    problems = dc.check_numbers(page(site, "# Study\n\nThe plug-in loses 0.6 nats.\n"))
    assert problems and "without a source" in problems[0][1] and "0.6" in problems[0][1]
    assert dc.check_numbers(page(site, "# Study\n\n<!-- prose: 0.6 (a published value) -->\nThe plug-in loses 0.6 nats.\n")) == []
    problems = dc.check_numbers(page(site, "# Study\n\n<!-- prose: 0.7 (stale) -->\nThe plug-in loses 0.6 nats.\n"))
    assert any("does not state" in m for _, m in problems) and any("without a source" in m for _, m in problems)
    problems = dc.check_numbers(page(site, "# Study\n\n<!-- prose: 0.6 -->\nThe plug-in loses 0.6 nats.\n"))
    assert any("reason" in m for _, m in problems)


def test_markers_that_name_nothing_fail(site):
    problems = dc.check_numbers(page(site, "<!-- numbers: docs/results/missing.json x -->\nIt is 1.5.\n"))
    assert any("no file" in m for _, m in problems)
    problems = dc.check_numbers(page(site, "<!-- numbers: docs/results/study.json nothing/here -->\nIt is 1.5.\n"))
    assert any("no number under key" in m for _, m in problems)
    problems = dc.check_numbers(page(site, "text\n\n<!-- numbers: docs/results/study.json sigma -->\n"))
    assert any("no block after it" in m for _, m in problems)


def test_derived_numbers_and_printed_strings(site):
    text = ("<!-- numbers: docs/results/study.json sigma; printed -->\n"
            "<!-- derived: 4.16 = {sigma/0} / {sigma/1}; 17 = {scores/n} - 19 -->\n"
            "The ratio is 4.16, the prior mean 253.5235 and 9.6218, and 17 is derived.\n")
    assert dc.check_numbers(page(site, text)) == []
    problems = dc.check_numbers(page(site, text.replace("ratio is 4.16", "ratio is 4.17")))
    assert any("4.17" in m for _, m in problems)


def test_how_numbers_are_read():
    read = lambda text: [n.shown for n in dc.numbers_in(text)]
    assert read("sigma 7-918, z = -3.1, 0.04 +- 0.02, 5.2x, 72%, s1 AGQ25 float64 theta_3") == \
        ["7", "918", "-3.1", "0.04", "0.02", "5.2", "72%"]
    assert read("Eq. 4 and section 7, Bates et al. 2015, Python 3.11, jax 0.10.2, `x = 3`") == []
    assert read("1.3e32 and 10^4; 20,000 tasks; (-0.42)") == ["1.3e32", "10^4", "20,000", "-0.42"]
    n = lambda text: dc.numbers_in(text)[0]
    assert dc.prints_as(n("5.7485"), -5.748512) and not dc.prints_as(n("-5.7485"), 5.748512)
    assert dc.prints_as(n("1.4e-4"), 1.4e-4) and not dc.prints_as(n("1.4e-4"), 1.5e-4)
    assert dc.prints_as(n("1.3e32"), 1.3e32) and dc.prints_as(n("10^4"), 2.7e4) and not dc.prints_as(n("10^4"), 2e5)
    assert dc.prints_as(n("72%"), 0.7222) and dc.prints_as(n("20,000"), 20000.0)


def test_a_dead_link_fails(site):
    good = "# Page\n\n## Its section\n\nSee [other](other.md#a-section), [here](#its-section), `docs/results/study.json`.\n"
    assert dc.check_links(page(site, good)) == []
    for old, new, says in (("other.md#", "gone.md#", "dead link"), ("#a-section", "#no-section", "dead anchor"),
                           ("(#its-section)", "(#nowhere)", "dead anchor"),
                           ("results/study.json", "results/{study,epil}.json", "no such file")):
        problems = dc.check_links(page(site, good.replace(old, new)))
        assert any(says in m for _, m in problems), (old, problems)


def test_a_broken_snippet_fails(site):
    text = ('# Page\n\n```python\nx = 2\n```\n\n<!-- quick: "1000" -> "3" -->\n```python\nn = 1000\nassert n == 3\n'
            'y = x + n\n```\n\n```python\nundefined_name + 1\n```\n')
    snippets = dc.snippets(page(site, text))
    assert [s.mode for s in snippets] == ["default"] * 3
    results = dc.run_snippets(snippets)
    assert results[snippets[0].where] is None and results[snippets[1].where] is None  # quick edit applied, names shared
    assert "NameError" in results[snippets[2].where] and "page.md" in results[snippets[2].where]
    problems = []
    dc.snippets(page(site, '<!-- quick: "2000" -> "3" -->\n```python\nn = 1000\n```\n'), problems)
    assert any("does not occur" in m for _, m in problems)
    problems = []
    dc.snippets(page(site, "<!-- run: slow (minutes) -->\n```python\nn = 1000\n```\n"), problems)
    assert any("slow set" in m for _, m in problems)
    problems = []
    dc.snippets(page(site, "<!-- run: no -->\n```python\nn = 1000\n```\n"), problems)
    assert any("reason" in m for _, m in problems)


def test_the_real_pages_fail_when_a_number_or_a_link_changes():
    """The same check on the committed pages, each edited once in memory."""
    path = dc.ROOT / "docs" / "sleepstudy.md"
    text = path.read_text()
    assert "-5.7485" in text and dc.check_numbers(dc.parse(path, text)) == []
    problems = dc.check_numbers(dc.parse(path, text.replace("-5.7485", "-5.7484", 1)))
    assert any("-5.7484" in m for _, m in problems), problems
    readme = dc.ROOT / "README.md"
    text = readme.read_text()
    assert "(docs/own-data.md)" in text
    problems = dc.check_links(dc.parse(readme, text.replace("(docs/own-data.md)", "(docs/own_data.md)", 1)))
    assert any("dead link: docs/own_data.md" in m for _, m in problems), problems
