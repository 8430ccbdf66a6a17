"""Generated tables in README.md and docs/: every results table is rendered from one file under docs/results.

A block is two marker lines with the generated text between them::

    <!-- table: docs/results/paper/leaderboard.csv names="fora:interval=3;taylorseer:interval=3" family=plain -->
    | method | cache | MACs speedup | ...
    <!-- /table -->

The source path is relative to the repository root. ``write(paths)`` rewrites every block in place from its source;
``check(paths)`` returns the blocks whose text differs from what their source gives (``cqpolicy docs`` and
``cqpolicy docs --check``). Text outside the markers is never touched.

Options follow the source as ``key=value`` words (shell quoting: a value with spaces goes in double quotes). Lists
are comma-separated, except ``names``, whose items contain commas and are separated by ``;``.

**A leaderboard CSV** (it has a ``method`` column; written by ``cqpolicy leaderboard``, ``cqpolicy run`` or
``cqpolicy bench --config``) renders one row per CSV row.

Rows. ``family=P,...`` keeps the rows whose ``family`` starts with one of the prefixes (``family=plain`` is the
uncached row); ``names=N;...`` keeps the rows named by one of N: the CSV's ``name`` column,
``cqpolicy.tracking.names.short_name(method)`` or the full ``method`` (the table shows ``name`` when the CSV has it,
else the short name). With both, a row is kept when it
matches either; with neither, every row. Then ``weights=W,...`` (``fp`` for unquantized), ``cache=C,...``
(``cache_dtype``) and ``macs=LO:HI`` (MACs speedup, inclusive, either end may be empty) drop the rows outside them.
``sort=KEY,...`` orders the rows (keys ``macs``, ``wall``, ``fid``, ``dfid``, ``dkid``, ``psnr``, ``name``; a
leading ``-`` sorts descending; ``given`` keeps the order of ``names``; default ``-macs``, ties in CSV order).
``top=N`` keeps the first N rows after sorting.

Columns. ``view=readme`` (default): method, cache, weights (only when some row is not ``fp``), MACs speedup, wall
speedup, FID, ΔFID, ΔKID, PSNR, verdict. ``view=full`` adds KID after ΔFID; ``view=compact`` is method, MACs
speedup, wall speedup, ΔFID, ΔKID, PSNR. ``cols=K,...`` lists the columns explicitly from ``name``, ``family``,
``cache``, ``weights``, ``size`` (model size in MB), ``macs``, ``wall``, ``fid``, ``dfid``, ``kid``, ``dkid``,
``psnr``, ``acc`` (class accuracy) and ``verdict``. ``bold=P,...`` bolds the method of rows whose family starts
with a prefix (default ``learned``; ``bold=none`` bolds nothing).

Numbers: speedups ``2.85×``; FID and ΔFID with 2 decimals, KID and ΔKID with 3, as mean ± std over replicates
(Δ: ± the std of the paired per-replicate differences against the plain model); PSNR with 1 decimal, ``∞`` for the
plain model. The verdict comes from the CSV columns ``beats`` / ``ties`` / ``loses_to`` / ``unopposed`` (protocol
v2, ``docs/protocol.md``): "beats all N opposed families" (the families named when N <= 2), or "beats k of N; ties
A; loses to B", then "; M unopposed" for the families that do not reach the row's MACs (parts left out when empty),
or "unopposed" when no other family reaches them. CSVs written before those columns existed carry
``not_beaten_by_margin`` and ``unopposed`` (protocol v1): the column is then headed "verdict (v1)" and reads "does not
beat A, B" or "beats all N families".

**Any other CSV** (a small table entered by hand from measurements, e.g. ``docs/results/models/*.csv``) renders as
a markdown table of its header and cells, unchanged.

**A .md or .txt file** (a script's printed table) is included verbatim; ``only=table`` keeps only its markdown
table lines (those starting with ``|``) and ``lines=A:B`` only lines A to B (1-based, inclusive).
"""
from __future__ import annotations

import csv
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

OPEN = re.compile(r"^<!-- table: (?P<spec>.+?) -->\s*$")
CLOSE = "<!-- /table -->"

LEADERBOARD_OPTIONS = {"family", "names", "weights", "cache", "macs", "sort", "top", "view", "cols", "bold"}
TEXT_OPTIONS = {"only", "lines"}

VIEWS = {
    "readme": ["name", "cache", "weights?", "macs", "wall", "fid", "dfid", "dkid", "psnr", "verdict"],
    "full": ["name", "cache", "weights?", "macs", "wall", "fid", "dfid", "kid", "dkid", "psnr", "verdict"],
    "compact": ["name", "macs", "wall", "dfid", "dkid", "psnr"],
}
HEADERS = {"name": "method", "family": "family", "cache": "cache", "weights": "weights", "size": "model size",
           "macs": "MACs speedup", "wall": "wall speedup", "fid": "FID", "dfid": "ΔFID ± paired std", "kid": "KID",
           "dkid": "ΔKID ± paired std", "psnr": "PSNR (dB)", "acc": "class accuracy", "verdict": "verdict"}
SORT_KEYS = {"macs": "macs_speedup", "wall": "wall_speedup", "fid": "fid_mean", "dfid": "delta_fid",
             "dkid": "delta_kid", "psnr": "psnr_vs_baseline", "name": "_name"}
PLAIN = "plain"
FP = "fp"


class TableError(ValueError):
    """A marker that cannot be rendered (bad option, missing source): one line naming the file and line."""


@dataclass
class Block:
    """One generated block: ``path``, the 1-based lines of its opening and closing markers, the marker's ``spec``,
    the text now between the markers and the text its source gives."""

    path: Path
    line: int
    end_line: int  # 1-based line of the closing marker
    spec: str
    current: str
    expected: str

    @property
    def stale(self) -> bool:
        return self.current != self.expected

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.spec}"


# -- parsing ------------------------------------------------------------------------------------------------------
def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``'SOURCE k=v ...'`` -> (SOURCE, {k: v})."""
    try:
        words = shlex.split(spec)
    except ValueError as exc:
        raise TableError(f"cannot parse table options {spec!r}: {exc}") from None
    if not words:
        raise TableError("table marker names no source")
    options = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise TableError(f"table option {word!r} is not key=value")
        if key in options:
            raise TableError(f"table option {key!r} given twice")
        options[key] = value
    return words[0], options


def find_blocks(text: str) -> list[tuple[int, int, str]]:
    """(index of the opening marker line, index of the closing marker line, spec) of every block in ``text``."""
    lines = text.split("\n")
    blocks, open_at, spec = [], None, ""
    for i, line in enumerate(lines):
        match = OPEN.match(line)
        if match:
            if open_at is not None:
                raise TableError(f"line {i + 1}: table marker inside the block opened on line {open_at + 1}")
            open_at, spec = i, match.group("spec")
        elif line.strip() == CLOSE:
            if open_at is None:
                raise TableError(f"line {i + 1}: {CLOSE} without an opening marker")
            blocks.append((open_at, i, spec))
            open_at = None
    if open_at is not None:
        raise TableError(f"line {open_at + 1}: table marker never closed with {CLOSE}")
    return blocks


# -- rendering ----------------------------------------------------------------------------------------------------
def render(spec: str, root: str | Path = ".") -> str:
    """The markdown a block with marker ``spec`` holds, from its source under ``root`` (no trailing newline)."""
    source, options = parse_spec(spec)
    path = Path(root) / source
    if not path.is_file():
        raise TableError(f"table source {source} not found")
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if "method" in header:
            return render_leaderboard(path, **_checked(options, LEADERBOARD_OPTIONS, source))
        _checked(options, set(), source)
        return render_csv(path)
    if path.suffix in (".md", ".txt"):
        return render_text(path, **_checked(options, TEXT_OPTIONS, source))
    raise TableError(f"table source {source}: not a .csv, .md or .txt file")


def _checked(options: dict, allowed: set, source: str) -> dict:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TableError(f"table source {source}: unknown option(s) {', '.join(unknown)} "
                         f"(allowed: {', '.join(sorted(allowed)) or 'none'})")
    return options


def render_text(path: Path, only: str | None = None, lines: str | None = None) -> str:
    text = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    if lines:
        lo, _, hi = lines.partition(":")
        try:
            text = text[int(lo or 1) - 1:int(hi) if hi else None]
        except ValueError:
            raise TableError(f"lines={lines!r}: expected A:B") from None
    if only is not None:
        if only != "table":
            raise TableError(f"only={only!r}: the only value is 'table'")
        text = [line for line in text if line.startswith("|")]
    return "\n".join(line.rstrip() for line in text).strip("\n")


def render_csv(path: Path) -> str:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows:
        raise TableError(f"{path}: empty CSV")
    lines = [_row(rows[0]), "|" + "---|" * len(rows[0])]
    lines += [_row(row) for row in rows[1:]]
    return "\n".join(lines)


def _row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _text(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _list(value) -> list[str]:
    return [v for v in _text(value).split(",") if v]


def _pm(mean, std, digits: int, sign: bool = False) -> str:
    m, s = _num(mean), _num(std)
    if math.isnan(m):
        return "–"
    text = f"{m:+.{digits}f}" if sign else f"{m:.{digits}f}"
    return text if math.isnan(s) else f"{text} ± {s:.{digits}f}"


def _times(value) -> str:
    v = _num(value)
    return "–" if math.isnan(v) else f"{v:.2f}×"


def _weights(row) -> str:
    return _text(row.get("weights")) or FP


def _short(method: str) -> str:
    from cqpolicy.tracking.names import short_name  # loads the policy registry (and torch): only when needed

    return short_name(method)


def render_leaderboard(path: str | Path, family: str | None = None, names: str | None = None,
                       weights: str | None = None, cache: str | None = None, macs: str | None = None,
                       sort: str = "-macs", top: str | None = None, view: str = "readme", cols: str | None = None,
                       bold: str = "learned") -> str:
    """A markdown table of the rows of a leaderboard CSV (options as in the module docstring, all strings)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:  # shown: the CSV's name, else the short name; matched: either, or the full method
        method = _text(row.get("method"))
        row["_keys"] = {_text(row.get("name")), _short(method), method} - {""}
        row["_name"] = _text(row.get("name")) or _short(method)
    all_families = {_text(r.get("family")) for r in rows} - {PLAIN, ""}
    plain_bytes = next((_num(r.get("model_bytes")) for r in rows if _text(r.get("family")) == PLAIN), math.nan)

    # rows: family / names select (either), weights / cache / macs restrict
    wanted = [n.strip() for n in names.split(";") if n.strip()] if names else []
    prefixes = [p for p in (family or "").split(",") if p]
    if wanted or prefixes:
        missing = [n for n in wanted if not any(n in r["_keys"] for r in rows)]
        if missing:
            raise TableError(f"{path}: no row named {'; '.join(missing)}")
        rows = [r for r in rows if r["_keys"] & set(wanted)
                or any(_text(r.get("family")).startswith(p) for p in prefixes)]
    if weights:
        rows = [r for r in rows if _weights(r) in weights.split(",")]
    if cache:
        rows = [r for r in rows if _text(r.get("cache_dtype")) in cache.split(",")]
    if macs:
        lo, sep, hi = macs.partition(":")
        if not sep:
            raise TableError(f"macs={macs!r}: expected LO:HI")
        low, high = _num(lo) if lo else -math.inf, _num(hi) if hi else math.inf
        rows = [r for r in rows if low <= _num(r.get("macs_speedup")) <= high]

    # order
    for key in reversed([k for k in sort.split(",") if k]):
        if key == "given":
            if not wanted:
                raise TableError("sort=given needs names=")
            position = {n: i for i, n in enumerate(wanted)}
            rows.sort(key=lambda r: min([position[k] for k in r["_keys"] if k in position] or [len(wanted)]))
            continue
        column = SORT_KEYS.get(key.lstrip("-"))
        if column is None:
            raise TableError(f"sort key {key!r}: choose from {', '.join(SORT_KEYS)}, given (- for descending)")
        descending = key.startswith("-")
        if column == "_name":
            rows.sort(key=lambda r: r["_name"], reverse=descending)
        else:  # NaN last either way
            sign = -1.0 if descending else 1.0
            rows.sort(key=lambda r: (math.isnan(_num(r.get(column))), sign * _num(r.get(column))
                                     if not math.isnan(_num(r.get(column))) else 0.0))
    if top:
        try:
            rows = rows[:int(top)]
        except ValueError:
            raise TableError(f"top={top!r}: expected a number") from None

    # columns
    if cols:
        keys = [k for k in cols.split(",") if k]
    elif view in VIEWS:
        keys = [k.rstrip("?") for k in VIEWS[view]
                if not k.endswith("?") or any(_weights(r) != FP for r in rows)]
    else:
        raise TableError(f"view={view!r}: choose from {', '.join(VIEWS)}")
    unknown = [k for k in keys if k not in HEADERS]
    if unknown:
        raise TableError(f"cols: unknown column(s) {', '.join(unknown)} (choose from {', '.join(HEADERS)})")
    v2 = bool(rows) and any(k in rows[0] for k in ("beats", "ties", "loses_to"))
    bolds = [] if bold == "none" else [p for p in bold.split(",") if p]

    def cell(row, key) -> str:
        plain = _text(row.get("family")) == PLAIN
        if key == "name":
            text = f"`{row['_name']}`"
            return f"**{text}**" if any(_text(row.get("family")).startswith(p) for p in bolds) else text
        if key == "family":
            return _text(row.get("family"))
        if key == "cache":
            return _text(row.get("cache_dtype"))
        if key == "weights":
            return _weights(row)
        if key == "size":
            size = _num(row.get("model_bytes"))
            if math.isnan(size) and _weights(row) == FP:
                size = plain_bytes  # unquantized rows logged no size: the plain model's
            return "–" if math.isnan(size) else f"{size / 1e6:.2f} MB"
        if key == "macs":
            return _times(row.get("macs_speedup"))
        if key == "wall":
            return _times(row.get("wall_speedup"))
        if key == "fid":
            return _pm(row.get("fid_mean"), row.get("fid_std"), 2)
        if key == "dfid":
            return _pm(row.get("delta_fid"), row.get("delta_fid_std"), 2, sign=True)
        if key == "kid":
            return _pm(row.get("kid_mean"), row.get("kid_std"), 3)
        if key == "dkid":
            return _pm(row.get("delta_kid"), row.get("delta_kid_std"), 3, sign=True)
        if key == "psnr":
            value = _num(row.get("psnr_vs_baseline"))
            return "∞" if plain or value == math.inf else ("–" if math.isnan(value) else f"{value:.1f}")
        if key == "acc":
            value = _num(row.get("class_accuracy"))
            return "–" if math.isnan(value) else f"{100 * value:.1f}%"
        return "–" if plain else (_verdict_v2(row) if v2 else _verdict_v1(row, all_families))

    headers = [HEADERS[k] + (" (v1)" if k == "verdict" and not v2 else "") for k in keys]
    lines = [_row(headers), "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r, k) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _verdict_v2(row) -> str:
    beats, ties, loses = _list(row.get("beats")), _list(row.get("ties")), _list(row.get("loses_to"))
    opposed = len(beats) + len(ties) + len(loses)
    if not opposed:
        return "unopposed"
    free = _list(row.get("unopposed"))
    if len(beats) == opposed:
        parts = ["beats " + ", ".join(beats) if opposed <= 2 else f"beats all {opposed} opposed families"]
    else:
        parts = [f"beats {len(beats)} of {opposed}"] if beats else []
    if ties:
        parts.append("ties " + ", ".join(ties))
    if loses:
        parts.append("loses to " + ", ".join(loses))
    if free:  # families that do not reach its MACs: not beaten, and the reader should see how many
        parts.append(f"{len(free)} unopposed")
    return "; ".join(parts)


def _verdict_v1(row, families: set) -> str:
    own = _text(row.get("family"))
    opposed = families - {own} - set(_list(row.get("unopposed")))
    not_beaten = _list(row.get("not_beaten_by_margin"))
    if not opposed and not not_beaten:
        return "unopposed"
    if not_beaten:
        return "does not beat " + ", ".join(not_beaten)
    return "beats " + ", ".join(sorted(opposed)) if len(opposed) <= 2 else f"beats all {len(opposed)} families"


# -- files --------------------------------------------------------------------------------------------------------
def default_paths(root: str | Path = ".") -> list[Path]:
    """README.md and every markdown file under docs/ (sorted)."""
    root = Path(root)
    return [p for p in [root / "README.md"] if p.is_file()] + sorted((root / "docs").glob("**/*.md"))


def blocks(path: str | Path, root: str | Path = ".") -> list[Block]:
    """Every block of ``path`` with its current and expected text."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    try:
        found = find_blocks(text)
    except TableError as exc:
        raise TableError(f"{path}: {exc}") from None
    out = []
    for start, end, spec in found:
        try:
            expected = render(spec, root)
        except TableError as exc:
            raise TableError(f"{path}:{start + 1}: {exc}") from None
        out.append(Block(path, start + 1, end + 1, spec, "\n".join(lines[start + 1:end]), expected))
    return out


def check(paths=None, root: str | Path = ".") -> list[Block]:
    """The blocks of ``paths`` (default: README.md and docs/**/*.md under ``root``) that differ from their source."""
    paths = default_paths(root) if paths is None else [Path(p) for p in paths]
    return [b for p in paths for b in blocks(p, root) if b.stale]


def write(paths=None, root: str | Path = ".") -> list[Block]:
    """Rewrite every block of ``paths`` from its source; returns the blocks that changed."""
    paths = default_paths(root) if paths is None else [Path(p) for p in paths]
    changed = []
    for path in paths:
        found = blocks(path, root)
        stale = [b for b in found if b.stale]
        if not stale:
            continue
        lines = path.read_text(encoding="utf-8").split("\n")
        for block in reversed(found):  # bottom-up: earlier line numbers stay valid
            lines[block.line:block.end_line - 1] = block.expected.split("\n") if block.expected else []
        path.write_text("\n".join(lines), encoding="utf-8")
        changed += stale
    return changed
