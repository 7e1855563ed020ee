"""The docs check: every number in README.md and docs/*.md has a recorded source, every relative
link resolves, every Python block runs.  The conventions are documented in docs/writing-docs.md.

Markers are single-line HTML comments (invisible when rendered); each applies to the next block
(a paragraph, a table, a list, a heading or a fenced code block) after it:

    <!-- numbers: FILE KEY; KEY -->       each number of the block equals, to its printed digits, a
                                          number stored under one of the KEYs of the JSON FILE
    <!-- derived: 2.3 = {KEY} / {KEY} --> a number computed from recorded values (arithmetic only)
    <!-- prose: 18, 2015 (reason) -->     these numbers have no JSON source (sizes, settings, dates,
                                          published values with their citation)
    <!-- prose block (reason) -->         no number of the block has a JSON source
    <!-- quick: "OLD" -> "NEW"; ... -->   (python block) the default suite runs it with these edits
    <!-- run: slow (reason) -->           (python block) only the slow set runs it (the block says so)
    <!-- run: no (reason) -->             (python block) not run, for the stated reason

A prose marker placed before a page's first heading, ``<!-- prose page: 50%, 90% (reason) -->``,
applies to every block of the page.  ``python tests/docs/docs_check.py [FILE...]`` prints every
problem; ``--suggest`` adds, for each number without a source, the keys of the named JSON files
whose values print as it.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
CODE_LANGUAGES = {"indented", "python", "py", "bash", "sh", "shell", "console", "toml", "yaml", "json", "ini", "cfg"}
PYTHON = {"python", "py"}


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and every docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


# ---------------------------------------------------------------------------- blocks and markers


@dataclass
class Block:
    """A paragraph, table, list, heading or fenced code block, with the markers before it."""

    path: Path
    line: int  # 1-based line of its first line
    text: str
    kind: str  # "text", "heading" or "code"
    lang: str = ""  # a code block's info string (first word)
    markers: list = field(default_factory=list)  # (line, kind, body)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"

    def marked(self, kind: str) -> list:
        return [(line, body) for line, k, body in self.markers if k == kind]


MARKER = re.compile(r"^\s*<!--\s*(numbers|derived|prose page|prose block|prose|quick|run)\b\s*:?\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")


@dataclass
class Page:
    path: Path
    blocks: list
    page_prose: list  # (line, body)
    problems: list  # (where, message) found while parsing


def parse(path: Path, text: Optional[str] = None) -> Page:
    """Split a markdown file into blocks and attach each marker to the block after it."""
    lines = (path.read_text() if text is None else text).splitlines()
    blocks, pending, page_prose, problems = [], [], [], []
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    i, seen_heading = 0, False

    def close(start, body, kind, lang=""):
        blocks.append(Block(path, start + 1, "\n".join(body), kind, lang, list(pending)))
        pending.clear()

    while i < len(lines):
        line = lines[i]
        m = MARKER.match(line)
        if m:
            kind, body = m.group(1), m.group(2)
            if kind == "prose page":
                if seen_heading:
                    problems.append((f"{rel}:{i + 1}", "a 'prose page' marker must come before the first section (##)"))
                page_prose.append((i + 1, body))
            else:
                pending.append((i + 1, kind, body))
            i += 1
            continue
        if "<!--" in line and ("numbers" in line or "prose" in line or "run:" in line or "quick" in line):
            problems.append((f"{rel}:{i + 1}", f"a malformed docs marker: {line.strip()!r}"))
        f = FENCE.match(line)
        if f:
            fence, lang, start, body = f.group(2), f.group(3).lower(), i, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence[:3]):
                body.append(lines[i])
                i += 1
            close(start, body, "code", lang)
            i += 1
            continue
        if not line.strip():
            i += 1
            continue
        if line.lstrip().startswith("#"):
            seen_heading = seen_heading or line.lstrip().startswith("##")
            close(i, [line], "heading")
            i += 1
            continue
        start, body = i, []
        while (i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith("#")
               and not FENCE.match(lines[i]) and not MARKER.match(lines[i])):
            body.append(lines[i])
            i += 1
        indented = all(line.startswith("    ") or line.startswith("\t") for line in body)
        close(start, body, "code" if indented else "text", "indented" if indented else "")  # an indented code block
    if pending:
        problems.append((f"{rel}:{pending[0][0]}", "a marker with no block after it"))
    return Page(path, blocks, page_prose, problems)


# ---------------------------------------------------------------------------- numbers in prose

REFERENCE_WORDS = r"(?:eqs?\.|secs?\.|equations?|sections?|§|experiments?|algorithms?|appendix|tables?|figures?|fig\.|issues?|et al\.,?)"
PACKAGES = (r"(?:python|jax|jaxlib|numpy|numpyro|arviz|scipy|pandas|statsmodels|lme4|glmmTMB|torch|pytorch|cuda|"
            r"flax|equinox|optax|blackjax|nutpie|mixedlm|formulae|formulaic|version|v)")
REFERENCE = re.compile(rf"\b{REFERENCE_WORDS}\s*\(?\d+(?:\.\d+)*(?:\s*(?:/|,|-|and|or)\s*\d+)*", re.IGNORECASE)
VERSION = re.compile(rf"\b{PACKAGES}\s+\d+(?:[.-]\d+|\.x)*", re.IGNORECASE)
NUMBER = re.compile(r"10\^[-−]?\d+|\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+")
UNITS = {"x", "s", "ms", "us", "h", "min", "k", "K", "M", "G", "B", "KB", "MB", "GB", "KiB", "MiB", "GiB",
         "nd", "rd", "th", "st", "d"}


@dataclass(frozen=True)
class Number:
    text: str  # as written, without sign or unit
    sign: str  # "-", "+" or ""
    percent: bool
    line: int  # line within the block (0-based)

    @property
    def shown(self) -> str:
        return f"{self.sign}{self.text}{'%' if self.percent else ''}"


def strip_non_claims(text: str) -> str:
    """Blank out what is not a claim: inline code, link targets, URLs, HTML comments, references
    (Eq. 4, section 7, et al. 2015), versions after a package name (Python 3.11)."""
    blank = lambda m: re.sub(r"[^\n]", " ", m.group(0))
    text = re.sub(r"<!--.*?-->", blank, text, flags=re.S)
    text = re.sub(r"(`+)(?:(?!\1).)+?\1", blank, text, flags=re.S)  # code spans may wrap lines
    text = re.sub(r"\]\([^)]*\)", blank, text)
    text = re.sub(r"<https?://[^>]*>|https?://\S+", blank, text)
    text = REFERENCE.sub(blank, text)
    text = VERSION.sub(blank, text)
    text = re.sub(r"^(\s*)(\d+\.)(\s)", lambda m: m.group(1) + " " * len(m.group(2)) + m.group(3), text,
                  flags=re.M)  # ordered-list markers
    text = re.sub(r"^(\s*#+\s*)(\d+\.)", lambda m: m.group(1) + " " * len(m.group(2)), text, flags=re.M)
    return text


def numbers_in(text: str) -> list[Number]:
    """The numbers a block states, with their sign (a minus that is not a hyphen or a range) and
    whether a % follows."""
    out = []
    for row, line in enumerate(strip_non_claims(text).split("\n")):
        for m in NUMBER.finditer(line):
            a, b = m.span()
            before = line[a - 1] if a else " "
            if before.isalnum() or before in "_.^/\\":
                continue
            if (before == "-" and a >= 2 and line[a - 2].isalpha()
                    and not re.search(r"\d(?:st|nd|rd|th)$", line[:a - 1])):  # a name (SHA-256), not "16th-84th"
                continue
            after = line[b:]
            if re.match(r"\.\d", after):  # a version or a dotted name
                continue
            unit = re.match(r"[A-Za-z]+", after)
            if unit and (unit.group(0) not in UNITS or re.match(r"\w", after[len(unit.group(0)):] or " ")):
                continue
            if unit is None and after[:1] == "_":
                continue
            sign = ""
            if before in "-−+":
                prev = line[a - 2] if a >= 2 else " "
                if before == "-" and prev == "+":  # "+-": plus or minus
                    sign = ""
                elif not (prev.isalnum() or prev in ")]_%."):
                    sign = "-" if before in "-−" else "+"
            token = m.group(0).replace("−", "-")
            percent = after[:1] == "%" or re.match(r"\s*[-–]\s*\d+(?:\.\d+)?\s*%", after) is not None  # "5-9%"
            out.append(Number(token, sign, percent, row))
    return out


def prints_as(number: Number, value: float) -> bool:
    """Whether ``value`` prints as ``number`` at its digits (or, for a percentage, ``100 value``)."""
    candidates = [value, 100.0 * value] if number.percent else [value]
    for v in candidates:
        if not math.isfinite(v):
            continue
        if number.sign == "-" and not v < 0:
            continue
        if number.sign == "+" and v < 0:
            continue
        a = abs(v)
        t = number.text.replace(",", "")
        if t.startswith("10^"):
            if a > 0 and math.floor(math.log10(a) + 1e-12) == int(t[3:].replace("−", "-")):
                return True
            continue
        if "e" in t.lower():
            mant, exp = t.lower().split("e")
            digits = len(mant.split(".")[1]) if "." in mant else 0
            m2, e2 = f"{a:.{digits}e}".split("e")
            if m2 == mant and int(e2) == int(exp):
                return True
            continue
        digits = len(t.split(".")[1]) if "." in t else 0
        if f"{a:.{digits}f}" == t:
            return True
    return False


# ---------------------------------------------------------------------------- recorded values


_JSON_CACHE: dict = {}


def load_json(path: Path):
    if path not in _JSON_CACHE:
        _JSON_CACHE[path] = json.loads(path.read_text())
    return _JSON_CACHE[path]


def leaves(obj, prefix=""):
    """(path, value) of every number in a JSON document; numeric strings count ("-2.0e-13")."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{prefix}/{i}" if prefix else str(i))
    elif isinstance(obj, bool) or obj is None:
        return
    elif isinstance(obj, (int, float)):
        yield prefix, float(obj)
    elif isinstance(obj, str):
        try:
            yield prefix, float(obj.replace(",", ""))
        except ValueError:  # printed text ("Normal(loc=[253.5235, 9.6218], ...)"): the numbers in it
            for i, m in enumerate(re.finditer(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", obj)):
                yield f"{prefix}#{i}", float(m.group(0))


def key_pattern(key: str) -> re.Pattern:
    """A key path (segments joined by /, ``*`` any one segment, ``**`` anything) as a regex over leaf
    paths: the key itself or anything under it."""
    if key in (".", "**"):
        return re.compile(".*")
    parts = [".*" if p == "**" else "[^/]*" if p == "*" else re.escape(p) for p in key.split("/")]
    return re.compile("/".join(parts) + "(?:[/#].*)?")


def resolve(path_text: str, page: Path) -> Path:
    p = Path(path_text)
    return p if p.is_absolute() else ROOT / p


def source_values(block: Block, problems: list) -> tuple[list, dict]:
    """The (path, value) pairs the block's numbers markers name, and the files by name."""
    values, files = [], {}
    for line, body in block.marked("numbers"):
        parts = body.split(None, 1)
        if not parts:
            problems.append((block.where, f"marker at line {line}: 'numbers:' needs a file and keys"))
            continue
        file = resolve(parts[0], block.path)
        if not file.is_file():
            problems.append((block.where, f"marker at line {line}: no file {parts[0]}"))
            continue
        files[parts[0]] = file
        data = list(leaves(load_json(file)))
        keys = [k.strip() for k in (parts[1] if len(parts) > 1 else ".").split(";") if k.strip()]
        for key in keys:
            scale = 1.0
            m = re.fullmatch(r"(.*?)\s*\*\s*([0-9.eE+-]+)", key)
            if m:  # KEY*1000: the values times 1000 (seconds quoted as ms)
                key, scale = m.group(1), float(m.group(2))
            pattern = key_pattern(key)
            chosen = [(f"{parts[0]}:{p}", v * scale) for p, v in data if pattern.fullmatch(p)]
            if not chosen:
                problems.append((block.where, f"marker at line {line}: no number under key {key!r} in {parts[0]}"))
            values += chosen
    return values, files


def derived_values(block: Block, files: dict, problems: list) -> dict:
    """``{token text: value}`` from ``derived:`` markers: arithmetic over {KEY} or {FILE:KEY} values."""
    out = {}
    for line, body in block.marked("derived"):
        for item in filter(None, (s.strip() for s in body.split(";"))):
            if "=" not in item:
                problems.append((block.where, f"marker at line {line}: 'derived:' needs TOKEN = EXPRESSION"))
                continue
            token, expr = (s.strip() for s in item.split("=", 1))

            def lookup(m):
                ref = m.group(1)
                name, key = ref.split(":", 1) if ":" in ref else (next(iter(files), None), ref)
                if name is None or name not in files and not resolve(name, block.path).is_file():
                    raise KeyError(f"no file for {{{ref}}}")
                file = files.get(name) or resolve(name, block.path)
                hits = [v for p, v in leaves(load_json(file)) if p == key]
                if len(hits) != 1:
                    raise KeyError(f"{{{ref}}} names {len(hits)} numbers, not one")
                return repr(hits[0])

            try:
                code = re.sub(r"\{([^}]+)\}", lookup, expr)
                if not re.fullmatch(r"[\d\s.eE+\-*/()]+|.*\b(?:abs|min|max|sqrt)\(.*", code):
                    raise ValueError(f"only arithmetic is allowed: {expr}")
                value = eval(code, {"__builtins__": {}}, {"abs": abs, "min": min, "max": max, "sqrt": math.sqrt})
            except Exception as err:  # noqa: BLE001 - reported as a problem of the page
                problems.append((block.where, f"marker at line {line}: derived {token!r}: {err}"))
                continue
            out.setdefault(token, []).append(float(value))
    return out


def prose_tokens(bodies: list, block: Block, problems: list, page_level=False) -> set:
    """Tokens listed in prose markers (their reason in parentheses is required)."""
    out = set()
    for line, body in bodies:
        items = [t.strip() for t in re.split(r",\s+(?![^()]*\))", body) if t.strip()]  # ", " outside (...)
        if not items or not re.search(r"\(.+\)\s*$", items[-1]):
            problems.append((block.where if block else "", f"marker at line {line}: a prose marker needs its reason "
                             "in parentheses"))
            continue
        out |= {re.sub(r"\s*\(.*\)\s*$", "", t).strip() for t in items}
    return out


def check_numbers(page: Page) -> list:
    """Problems with the numbers of a page: numbers with no source, numbers that differ from their
    source, markers that name nothing or list tokens the block does not contain."""
    problems = list(page.problems)
    page_tokens = prose_tokens(page.page_prose, None, problems, page_level=True)
    for block in page.blocks:
        if block.kind == "code" and block.lang in CODE_LANGUAGES:
            continue
        found = numbers_in(block.text)
        if block.marked("prose block"):
            for line, body in block.marked("prose block"):
                if not re.fullmatch(r"\(.+\)", body.strip()):
                    problems.append((block.where, f"marker at line {line}: 'prose block' needs its reason in parentheses"))
            continue
        exempt = prose_tokens(block.marked("prose"), block, problems)
        for token in exempt:
            if not any(token in (n.text, n.shown, f"{n.text}%" if n.percent else n.text) for n in found):
                problems.append((block.where, f"prose marker lists {token!r}, which the block does not state"))
        exempt |= page_tokens
        values, files = source_values(block, problems)
        derived = derived_values(block, files, problems)
        missing, wrong = [], []
        for n in found:
            if n.text in exempt or n.shown in exempt or (n.percent and f"{n.text}%" in exempt):
                continue
            if any(prints_as(n, v) for v in derived.get(n.shown, []) + derived.get(n.text, [])):
                continue
            if not values:
                missing.append(n.shown)
            elif not any(prints_as(n, v) for _, v in values):
                wrong.append(n.shown)
        if missing:
            problems.append((block.where, "numbers without a source (add a numbers: or prose: marker): "
                             + ", ".join(dict.fromkeys(missing))))
        if wrong:
            problems.append((block.where, "numbers that no value under the marker's keys prints as: "
                             + ", ".join(dict.fromkeys(wrong))))
    return problems


# ---------------------------------------------------------------------------- links


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^#+\s*", "", heading.strip())
    text = re.sub(r"`([^`]*)`", r"\1", text)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    out, counts = set(), {}
    for block in parse(path).blocks:
        if block.kind == "heading":
            a = github_anchor(block.text)
            n = counts.get(a, 0)
            counts[a] = n + 1
            out.add(a if n == 0 else f"{a}-{n}")
    out |= set(re.findall(r'<a\s+(?:id|name)="([^"]+)"', path.read_text()))
    return out


LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REPO_PATH = re.compile(r"^(?:python\s+)?((?:docs|examples|tests|benchmarks|hiermeta|models)/[\w./{},*-]+)")


def expand_braces(text: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", text)
    if not m:
        return [text]
    return [y for alt in m.group(1).split(",") for y in expand_braces(text[: m.start()] + alt + text[m.end():])]


def check_links(page: Page) -> list:
    """Every relative link and every repository path in inline code resolves: files exist, anchors
    are headings of their page."""
    problems = []
    for block in page.blocks:
        if block.kind == "code":
            continue
        text = re.sub(r"<!--.*?-->", "", block.text)
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (page.path.parent / file).resolve() if file else page.path
            if not dest.exists():
                problems.append((block.where, f"dead link: {target}"))
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append((block.where, f"dead anchor: {target}"))
        for code in re.findall(r"`([^`]+)`", text):
            m = REPO_PATH.match(code.strip())
            if not m:
                continue
            for candidate in expand_braces(m.group(1).rstrip(".,")):
                if not re.search(r"\.\w+$", candidate) or re.search(r"(?:^|/)[A-Z][A-Z_]+(?:\.|/|$)", candidate):
                    continue  # a schema name, a folder, or a placeholder such as examples/NAME.py
                if not any(ROOT.glob(candidate)):
                    problems.append((block.where, f"no such file in the repository: {candidate}"))
    return problems


# ---------------------------------------------------------------------------- python blocks


@dataclass
class Snippet:
    where: str
    page: str
    code: str  # as it will run
    mode: str  # "default", "slow" or "no"
    reason: str = ""


def snippets(page: Page, problems: Optional[list] = None) -> list[Snippet]:
    """The page's Python blocks, each with the mode it runs in and the code it runs."""
    problems = [] if problems is None else problems
    out = []
    for block in page.blocks:
        if block.kind != "code" or block.lang not in PYTHON:
            continue
        mode, reason = "default", ""
        for line, body in block.marked("run"):
            m = re.fullmatch(r"(slow|no)\s*\((.+)\)", body.strip())
            if not m:
                problems.append((block.where, f"marker at line {line}: 'run:' takes 'slow (reason)' or 'no (reason)'"))
                continue
            mode, reason = m.group(1), m.group(2)
        if mode == "slow" and not re.search(r"#.*slow set", block.text):
            problems.append((block.where, "a block the slow set runs must say so in a comment ('# ... slow set ...')"))
        code = block.text
        for line, body in block.marked("quick"):
            edits = re.findall(r'"((?:[^"\\]|\\.)*)"\s*->\s*"((?:[^"\\]|\\.)*)"', body)
            if not edits:
                problems.append((block.where, f"marker at line {line}: 'quick:' takes \"OLD\" -> \"NEW\"; ..."))
            for old, new in edits:
                old, new = old.replace('\\"', '"'), new.replace('\\"', '"')
                if old not in code:
                    problems.append((block.where, f"quick edit {old!r} does not occur in the block"))
                code = code.replace(old, new)
        out.append(Snippet(block.where, str(page.path), code, mode, reason))
    return out


RUNNER = r"""
import json, sys, traceback, os, resource
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
spec = json.load(open(sys.argv[1]))
cache = spec.get("cache")
if cache:
    import hiermeta
    hiermeta.enable_compilation_cache(cache)
results, spaces = [], {}
for s in spec["snippets"]:
    space = spaces.setdefault(s["page"], {"__name__": "__docs__"})
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = usage.ru_utime + usage.ru_stime
    try:
        exec(compile(s["code"], s["where"], "exec"), space)
        results.append({"where": s["where"], "ok": True})
    except BaseException:
        results.append({"where": s["where"], "ok": False, "error": traceback.format_exc(limit=-4)})
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results[-1]["cpu_s"] = usage.ru_utime + usage.ru_stime - start
    sys.stdout.flush()
json.dump(results, open(sys.argv[2], "w"))
"""


def run_snippets(chosen: list[Snippet], timeout: float = 1800.0, cache: Optional[str] = None,
                 cpu: Optional[dict] = None) -> dict:
    """Run the snippets in one fresh Python process (a namespace per page, blocks in order), in a
    temporary directory; returns ``{where: error or None}`` (and fills ``cpu`` with each block's
    CPU seconds, if given)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        result = Path(tmp) / "result.json"
        spec.write_text(json.dumps({"snippets": [s.__dict__ for s in chosen], "cache": cache}))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   MPLBACKEND="Agg")
        proc = subprocess.run([sys.executable, "-c", RUNNER, str(spec), str(result)], cwd=tmp, env=env,
                              capture_output=True, text=True, timeout=timeout)
        if not result.exists():
            return {s.where: f"the runner failed:\n{proc.stderr[-4000:]}" for s in chosen}
        records = json.loads(result.read_text())
        if cpu is not None:
            cpu.update({r["where"]: r["cpu_s"] for r in records})
        return {r["where"]: (None if r["ok"] else r["error"]) for r in records}


# ---------------------------------------------------------------------------- command line


def suggest(number: Number, files: list[Path]) -> list[str]:
    hits = []
    for file in files:
        for p, v in leaves(load_json(file)):
            if prints_as(number, v):
                hits.append(f"{file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}:{p}")
    return hits


def propose(block: Block, files: list[Path], depth: int = 2) -> tuple[list[str], list[str]]:
    """For a block without a source: ``numbers:`` markers (a greedy cover of its numbers by key
    prefixes of at most ``depth`` keys in the given JSON files) and the numbers none of them holds."""
    found = [n for n in numbers_in(block.text)]
    cover: dict = {}  # (file, prefix) -> indices of the numbers it holds
    for file in files:
        name = str(file.relative_to(ROOT) if file.is_relative_to(ROOT) else file)
        data = list(leaves(load_json(file)))
        for i, n in enumerate(found):
            for p, v in data:
                if prints_as(n, v):
                    parts = re.split(r"[/#]", p)
                    prefix = "/".join(parts[:depth]) if len(parts) > depth else "/".join(parts[:-1]) or "."
                    cover.setdefault((name, prefix), set()).add(i)
    left, markers = set(range(len(found))), {}
    while left and cover:
        best = max(cover, key=lambda k: (len(cover[k] & left), -len(k[1])))
        gained = cover[best] & left
        if not gained:
            break
        markers.setdefault(best[0], []).append(best[1])
        left -= gained
    lines = [f"<!-- numbers: {f} {'; '.join(ps)} -->" for f, ps in markers.items()]
    return lines, sorted({found[i].shown for i in left})


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path, help="markdown files (default: README.md and docs/*.md)")
    p.add_argument("--suggest", nargs="*", type=Path, default=[], help="JSON files to search for unsourced numbers")
    p.add_argument("--propose", nargs="*", type=Path, default=[],
                   help="JSON files: print a numbers: marker for each block without a source")
    args = p.parse_args(argv)
    problems = []
    for path in [f.resolve() for f in args.files] or doc_files():
        page = parse(path)
        if args.propose:
            for block in page.blocks:
                if block.kind == "code" and block.lang in CODE_LANGUAGES or block.markers or not numbers_in(block.text):
                    continue
                lines, left = propose(block, [f.resolve() for f in args.propose])
                print(f"{block.where}: {block.text.splitlines()[0][:70]!r}")
                for line in lines:
                    print(f"    {line}")
                if left:
                    print(f"    not found: {', '.join(left)}")
            continue
        found = check_numbers(page) + check_links(page)
        snippets(page, found)
        for where, message in found:
            print(f"{where}: {message}")
            if args.suggest and message.startswith("numbers"):
                for token in message.rsplit(": ", 1)[1].split(", "):
                    sign = token[0] if token[0] in "+-" else ""
                    n = Number(token.lstrip("+-").rstrip("%"), sign, token.endswith("%"), 0)
                    print(f"    {token}: " + (", ".join(suggest(n, args.suggest)[:8]) or "-"))
        problems += found
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
