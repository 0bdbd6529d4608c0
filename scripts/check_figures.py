"""Every measured figure in README.md and docs/*.md is traced to a results file.

    python scripts/check_figures.py            # exit 1 with the offending figures, else 0
    python scripts/check_figures.py --list     # also print each figure and the file it traced to

Stdlib only, well under a second.  The rule (summed up in docs/DESIGN.md, "Every number
traced"):

**Blocks.**  Each Markdown file is cut into blocks: a fenced code block, a table (consecutive
lines starting with ``|``), a list item (``-``, ``*``, ``+`` or ``1.`` and its continuation
lines), a heading, and a paragraph (any other run of non-blank lines).  A table, a fenced block
or a list item also has a *lead*: the last paragraph before it, through any tables, fenced
blocks and list items in between (a heading ends the chain).  The lead is where a table's
caption or a list's introduction names its source.

**Figures.**  Fenced blocks tagged with a language (bash, python, ...) are code and skipped,
and so are inline code spans and HTML comments.  Everywhere else (prose, table cells, untagged
fenced blocks, which hold pasted results) a *figure* is

- a number with a unit: ``%``, ``ms``, ``s``, ``min``, ``h``, ``µs``/``us``, ``ns``, ``GB/s``,
  ``MB/s``, ``images/s``, ``points``, ``aten calls``, ``passed``/``failed``/``skipped``/
  ``errors``/``tests``, ``runs``; a ratio ``×`` or ``x`` written right after the number
  (``1.13×``, ``2x``) or right before it (``×0.58``); a size (``MiB``, ``MB``, ``kB``...) only
  with a decimal part (``524.1 MiB``; ``4 KiB`` pages are a fact, not a measurement);
- every number of a range or list that ends in such a figure (``0.95–1.55×``, ``1.7-1.9 s``,
  ``99.9 / 100.0 %``);
- any other number with a decimal part (``52.7 vs 50.0``, ``load average 1.2``).

Not figures: integers without a unit (counts, batch sizes, seeds, years, sizes), shapes and
products (``64×64×56×56``, ``8x16x14x14``, ``2 × 1 000``: a ``×`` with a number on both sides),
blend weights (a parenthesised tuple of numbers in [0, 1] summing to 1: ``(0.6, 0.4, 0)``),
scientific notation (tolerances: ``1e-5``), versions (``2.13.0``, ``Python 3.11``, ``torch >=
2.4``), numbers glued to a word or symbol (``§2``, ``D5``, ``sm_90``, ``fp32``, ``ResNet-50``,
``34c89bd``), bounds and goals (a number right after ``≤ ≥ < > =``: ``goal ≤ 1.05``, ``< 1 %
growth``), and the entries of ``ALLOWED`` below (a non-measured number in its context, with the
reason: time budgets, settings).

**Tracing.**  A block's results files are the ``bench/results/<file>`` paths it or its lead
names (a bare name such as ``demo_sev5.json`` counts when that file exists in
``bench/results/``; a PNG is named but holds no figures).  Each block with figures must name at
least one, and each figure must appear in one of them as the same number: the same digits and
decimals, ignoring sign, thousands separators and the unit (``1.13×`` matches ``1.13x``,
``188 067`` matches ``188,067``; ``34`` does not match ``34.14``: write the file's digits, or
put the rounded or derived figure into the results file's reading notes with what it comes
from).  A short integer can still match some unrelated number of a large file: the check
proves that a figure's digits are in the file it names, not that they mean the same thing.

**Not measured here.**  A block preceded by a line ``<!-- not-measured: <reason> -->`` (and the
tables, fenced blocks and list items it leads) holds no measurement of this project: figures
from the literature or a cost model.  Its text must say so in words too.

**Results files.**  Every ``bench/results/*.md`` states its provenance: the words ``command``,
``commit`` and ``machine`` (``unknown`` is an honest value; ``datta_kernels.benchmarking``
writes the three into every result header), and every other results file (JSON, PNG) is named
by one of the ``.md`` files.

``PENDING`` lists figures known to be untraced, with the reason; each is reported on every run,
and an entry that no longer matches an untraced figure fails the check, so the list only
shrinks.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "bench/results"

#: Non-measured numbers in their context: (file, regex over the block's text, reason).  A
#: figure inside a match is not a figure.
ALLOWED: tuple[tuple[str, str, str], ...] = (
    ("README.md", r"at most 8\s+minutes", "the GPU check's time budget (scripts/gpu_check.sh), a limit"),
    ("docs/DESIGN.md", r"fits 8\s+minutes", "the GPU check's time budget, a limit"),
    ("docs/DESIGN.md", r"~15 minutes in all", "the device time a lent GPU comes with, a limit"),
    ("docs/DISTRIBUTED.md", r"30 s collective\s+timeout, 90 s join bound", "test settings"),
    ("docs/SPEC.md", r"\(0\.2 steps", "the calibration grid's step, a setting"),
    ("docs/SPEC.md", r"`source_rate` 0\.8", "DYN's hyper-parameter, a setting"),
    ("docs/SPEC.md", r"momentum 0\.9", "the optimizer's setting"),
)

#: Figures known to be untraced: (file, figure as written, reason).  Reported on every run;
#: an entry that no longer matches an untraced figure is an error (remove it).
_DEMO = "README's main-job section, left for the demo re-run that rewrites it and demo.md: "
PENDING: tuple[tuple[str, str, str], ...] = ()

UNITS = (
    r"images/s", r"img/s", r"GB/s", r"MB/s", r"aten\s+calls", r"aten\s+ops", r"points?",
    r"passed", r"failed", r"skipped", r"errors", r"tests", r"runs?",
    r"%", r"ms", r"µs", r"us", r"ns", r"min(?:utes?)?", r"s(?:econds?)?", r"h(?:ours?)?",
)
SIZE_UNITS = r"(?:KiB|MiB|GiB|TiB|kB|KB|MB|GB|TB)"
_UNIT_RE = re.compile(
    r"[ \u00a0\u202f]?(?:\*\*)?(?P<unit>" + SIZE_UNITS + "|" + "|".join(UNITS) + r")(?![\w/])")
# a number: digits with optional thousands groups (1 000, 188,067), optional decimals
_NUM = r"\d{1,3}(?:(?:[ \u00a0\u202f]\d{3})+|(?:,\d{3})+)(?![\d,])(?:\.\d+)?|\d+(?:\.\d+)?"
_NUM_RE = re.compile(_NUM)
_SEP_RE = re.compile(r"-|\s*[–—/]\s*|\s+to\s+")  # ranges and lists: 1.7-1.9 s, 0.95–1.55×, 99 / 100 %
_FILE_RE = re.compile(r"(?:bench/results/)?[\w.-]+\.(?:md|json|csv|txt|png)\b")
TEXT_SUFFIXES = (".md", ".json", ".csv", ".txt")  # a figure can be traced to these, not to a PNG
_MARKER_RE = re.compile(r"^\s*<!--\s*not-measured:\s*(?P<why>.*?)\s*-->\s*$")
_FENCE_RE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
_ITEM_RE = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")
_VERSION_WORDS = ("python", "torch", "triton", "cuda", "version", "gcc", "nvcc", "glibc")
PROSE_FENCES = ("", "text", "txt", "console", "output")


@dataclass
class Block:
    path: str
    line: int
    kind: str  # paragraph, table, item, fence, heading
    text: str
    exempt: str = ""  # the not-measured reason, if any
    lead: Block | None = None
    lang: str = ""


@dataclass
class Figure:
    text: str  # as written, with its unit
    number: str  # normalised: digits and decimals only
    start: int


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    traced: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------- blocks
def split_blocks(text: str, path: str) -> list[Block]:
    """Cut Markdown into blocks (see the module docstring) and link each table, fenced block
    and list item to its lead paragraph."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i, marker = 0, ""

    def add(kind: str, start: int, body: list[str], lang: str = "") -> None:
        nonlocal marker
        blocks.append(Block(path, start + 1, kind, "\n".join(body), marker, lang=lang))
        marker = ""

    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        m = _MARKER_RE.match(line)
        if m:
            marker = m.group("why") or "not measured"
            i += 1
            continue
        m = _FENCE_RE.match(line)
        if m:
            fence, start = m.group(1), i
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                i += 1
            add("fence", start, lines[start + 1:i], lang=m.group(2).lower())
            i += 1
            continue
        if line.lstrip().startswith("#"):
            add("heading", i, [line])
            i += 1
            continue
        if line.lstrip().startswith("|"):
            start = i
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                i += 1
            add("table", start, lines[start:i])
            continue
        kind, start = ("item" if _ITEM_RE.match(line) else "paragraph"), i
        i += 1
        while i < len(lines):
            nxt = lines[i]
            if (not nxt.strip() or _ITEM_RE.match(nxt) or _FENCE_RE.match(nxt)
                    or nxt.lstrip().startswith(("#", "|")) or _MARKER_RE.match(nxt)):
                break
            i += 1
        add(kind, start, lines[start:i])
    lead: Block | None = None
    for b in blocks:
        if b.kind == "paragraph":
            lead = b
        elif b.kind == "heading":
            lead = None
        else:
            b.lead = lead
    return blocks


# ------------------------------------------------------------------------------ figures
def _mask_code(text: str) -> str:
    """Inline code spans and HTML comments replaced by spaces (same offsets)."""
    text = re.sub(r"<!--.*?-->", lambda m: " " * len(m.group()), text, flags=re.S)
    return re.sub(r"(`+)(.+?)\1", lambda m: " " * len(m.group()), text, flags=re.S)


def normalise(num: str) -> str:
    return re.sub(r"[ ,\u00a0\u202f]", "", num)


def _blend_spans(text: str) -> list[tuple[int, int]]:
    """Parenthesised tuples of numbers in [0, 1] that sum to 1: blend weights ``(0.6, 0.4, 0)``."""
    spans = []
    for m in re.finditer(r"\((\s*\d+(?:\.\d+)?(?:\s*,\s*\d+(?:\.\d+)?)+\s*)\)", text):
        values = [float(v) for v in m.group(1).split(",")]
        if all(0 <= v <= 1 for v in values) and abs(sum(values) - 1) < 1e-6:
            spans.append(m.span())
    return spans


def find_figures(text: str, allowed: list[str] = ()) -> list[Figure]:
    """The figures of one block's text (see the module docstring for the rule)."""
    masked = _mask_code(text)
    skip = _blend_spans(masked)
    for pattern in allowed:
        skip += [m.span() for m in re.finditer(pattern, text)]
    tokens = []  # (start, end, number, unit or "")
    for m in _NUM_RE.finditer(masked):
        s, e = m.span()
        before, after = masked[:s], masked[e:]
        prev = before[-1:] or " "
        if re.match(r"[\w§.'’]", prev):  # sev3, sm_80, D5, §2, fp32, 2.13.0's tail
            continue
        if prev in "-‐" and re.search(r"[A-Za-z]-$", before):  # ResNet-50, AVX-512
            continue
        if re.match(r"[eE][+\-−]?\d|\.\d", after):  # 1e-5; 2.13.0: a version
            continue
        if (re.match(r"[ \u00a0]?[×x][ \u00a0]?\d", after)  # 64x64x56x56, 2 × 1 000
                or re.search(r"\d[ \u00a0]?[×x][ \u00a0]?$", before)):
            continue
        word = re.search(r"(\w+)[ \u00a0]*(?:>=|==)?[ \u00a0]*$", before)
        if word and word.group(1).lower() in _VERSION_WORDS:  # Python 3.11, torch >= 2.4
            continue
        if re.search(r"(?:[≤≥<>=])[ \u00a0]*(?:\*\*)?[ \u00a0]*[+\-−~]?$", before):  # goal ≤ 1.05
            continue
        if any(a <= s and e <= b for a, b in skip):
            continue
        um = _UNIT_RE.match(after)
        unit = um.group("unit") if um else ""
        if re.match(r"[×x](?!\w)", after):  # a ratio, written right after its number: 1.13×, 2x
            um, unit = re.match(r"(?P<unit>[×x])", after), "×"
        if re.fullmatch(SIZE_UNITS, unit) and "." not in m.group():  # 4 KiB: a fact
            continue
        if not unit and re.search(r"×$", before):  # ×0.58: a ratio written first
            unit, um = "×", None
        if not unit and re.match(r"[A-Za-z_]", after):  # 34c89bd, 2nd, 3b, 2D
            continue
        end = e + um.end() if um else e
        tokens.append((s, end, m.group(), unit))
    figures = []
    for k, (s, e, num, unit) in enumerate(tokens):
        is_fig = bool(unit) or "." in num
        j = k
        while not is_fig and j + 1 < len(tokens) and _SEP_RE.fullmatch(masked[tokens[j][1]:tokens[j + 1][0]]):
            j += 1  # a member of a range or list that ends in a unit
            is_fig = bool(tokens[j][3])
        if is_fig:
            figures.append(Figure(text[s:e].strip(), normalise(num), s))
    return figures


# ------------------------------------------------------------------------------ tracing
def named_files(text: str, root: Path) -> list[str]:
    """Results files a text names: ``bench/results/...`` paths and bare names that exist there."""
    out = []
    for m in _FILE_RE.finditer(text):
        name = m.group()
        rel = name if name.startswith(RESULTS + "/") else f"{RESULTS}/{name}"
        if (name.startswith(RESULTS + "/") or (root / rel).is_file()) and rel not in out:
            out.append(rel)
    return out


_TOKEN_CACHE: dict[tuple[Path, int, int], set[str]] = {}


def file_numbers(path: Path) -> set[str]:
    """Every number of a results file, normalised (with and without thousands groups)."""
    st = path.stat()
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _TOKEN_CACHE:
        text = path.read_text(errors="replace")
        nums = {normalise(m.group()) for m in _NUM_RE.finditer(text)}
        nums |= set(re.findall(r"\d+(?:\.\d+)?", text))
        _TOKEN_CACHE[key] = nums
    return _TOKEN_CACHE[key]


def check_block(block: Block, root: Path, allowed: list[str]):
    """``(untraced, traced)`` for one block: ``untraced`` holds ``(figure, message)`` pairs
    (figure ``""`` for a problem of the block), ``traced`` ``(figure, results file)`` pairs."""
    if block.kind == "heading" or (block.kind == "fence" and block.lang not in PROSE_FENCES):
        return [], []
    if block.exempt or (block.lead is not None and block.lead.exempt):
        return [], []
    figures = find_figures(block.text, allowed)
    if not figures:
        return [], []
    files = [f for f in named_files(block.text, root) if f.endswith(TEXT_SUFFIXES)]
    if block.lead is not None:
        files += [f for f in named_files(block.lead.text, root)
                  if f.endswith(TEXT_SUFFIXES) and f not in files]
    where = f"{block.path}:{block.line}"
    if not files:
        return [(f.text, f"{where}: {f.text!r} in a {block.kind} that names no results file "
                 f"({RESULTS}/...)") for f in figures], []
    untraced, traced = [], []
    present = [f for f in files if (root / f).is_file()]
    untraced += [("", f"{where}: names {f}, which does not exist") for f in files if f not in present]
    for fig in figures:
        hit = next((f for f in present if fig.number in file_numbers(root / f)), None)
        if hit is None:
            untraced.append((fig.text, f"{where}: {fig.text!r} is in none of {', '.join(files)}"))
        else:
            traced.append((fig.text, hit))
    return untraced, traced


def check_results_dir(root: Path) -> list[str]:
    """Every results .md states command, commit and machine; every other file or folder is
    named by one."""
    errors, named = [], set()
    results = sorted((root / RESULTS).glob("*")) if (root / RESULTS).is_dir() else []
    for p in results:
        if p.suffix != ".md":
            continue
        text = p.read_text(errors="replace")
        named |= set(named_files(text, root))
        for word in ("command", "commit", "machine"):
            if not re.search(word, text, re.I):
                errors.append(f"{RESULTS}/{p.name}: no provenance line naming the {word}")
        # a folder (raw logs) is named by its path
        named |= {f"{RESULTS}/{d.name}" for d in results if d.is_dir() and f"{RESULTS}/{d.name}" in text}
    for p in results:
        if p.suffix != ".md" and f"{RESULTS}/{p.name}" not in named:
            errors.append(f"{RESULTS}/{p.name}: not named by any {RESULTS}/*.md (its provenance)")
    return errors


def doc_paths(root: Path) -> list[Path]:
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def check(root: Path = ROOT, allowed=ALLOWED, pending=PENDING) -> Report:
    """Check README.md and docs/*.md under ``root`` against ``root/bench/results``."""
    report = Report()
    untraced: list[tuple[str, str, str]] = []  # (file, figure, message)
    docs = {path.relative_to(root).as_posix(): path.read_text() for path in doc_paths(root)}
    for file, pattern, _ in allowed:
        if not re.search(pattern, docs.get(file, "")):
            report.errors.append(f"ALLOWED entry matches nothing, remove it: {(file, pattern)}")
    for rel, text in docs.items():
        pats = [p for f, p, _ in allowed if f == rel]
        for block in split_blocks(text, rel):
            bad, traced = check_block(block, root, pats)
            untraced += [(rel, fig, msg) for fig, msg in bad]
            report.traced += [f"{rel}:{block.line}: {fig} <- {hit}" for fig, hit in traced]
    used = set()
    for rel, fig, err in untraced:
        entry = next((p for p in pending if p[0] == rel and p[1] == fig), None)
        if entry is None:
            report.errors.append(err)
        else:
            used.add(entry)
            report.pending.append(f"{err}  [pending: {entry[2]}]")
    for entry in pending:
        if entry not in used:
            report.errors.append(f"PENDING entry no longer needed, remove it: {entry[:2]}")
    report.errors += check_results_dir(root)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=ROOT)
    p.add_argument("--list", action="store_true", help="print every traced figure too")
    args = p.parse_args(argv)
    report = check(args.root)
    if args.list:
        print("\n".join(report.traced))
    for line in report.pending:
        print("pending:", line)
    if report.errors:
        print(f"check_figures: {len(report.errors)} untraced figure(s) or provenance gap(s):")
        print("\n".join("  " + e for e in report.errors))
        return 1
    print(f"check_figures: {len(report.traced)} figures traced to their results files"
          + (f", {len(report.pending)} pending" if report.pending else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
