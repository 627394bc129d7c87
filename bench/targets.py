"""Benchmark targets, read from the ``target`` columns of ``BENCHMARKS.md``.

The targets live in one place, the tables people read; ``python -m bench --check`` reads
the same cells. A target cell is::

    [`subject`] OP NUMBER [UNIT] [" — " or " (" and anything: "— met", "(note)"]

- OP is one of ``≤ < ≥ >`` (``<=`` and ``>=`` too).
- UNIT is ``ms``, ``s``, ``MB``, ``MB/s`` or ``×`` (``x``). Time bounds are converted to the
  key's own unit: keys ending in ``_s`` hold seconds, other time keys milliseconds.
- The subject is a benchmark key or a ratio of two, in backticks (``\\`a / b\\` ≤ 1.3×``);
  without one it is the row's key, the first backticked word of the row's first cell.
  A ratio needs the ``×`` unit and a plain key must not have it, so a bound cannot be
  read against the wrong quantity.
- ``*`` in a key stands for one name segment (letters and digits, no ``_``), the same one on
  both sides of a ratio: ``snapshot_create_*`` is ``snapshot_create_64m`` and ``_2g``.

Cells without an operator (blank, ``(background)``) are not targets; a cell with one that
does not parse is an error, so a typo cannot turn a target off.
"""

# ruff: noqa: RUF001, RUF002, RUF003  (× is the ratio unit of the syntax this module reads)
from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

OPS: dict[str, tuple[str, Callable[[float, float], bool]]] = {
    "≤": ("≤", operator.le),
    "<=": ("≤", operator.le),
    "<": ("<", operator.lt),
    "≥": ("≥", operator.ge),
    ">=": ("≥", operator.ge),
    ">": (">", operator.gt),
}
_KEY = r"[A-Za-z0-9_*]+"
_CELL = re.compile(
    rf"^\s*(?:`\s*(?P<num>{_KEY})\s*(?:/\s*(?P<den>{_KEY})\s*)?`\s*)?"
    r"(?P<op><=|>=|≤|≥|<|>)\s*(?P<bound>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>MB/s|ms|s|MB|×|x)?\s*(?:$|[—(,;-])"
)
_ROW_KEY = re.compile(rf"`({_KEY})`")


class TargetError(ValueError):
    """A target cell in BENCHMARKS.md that does not follow the syntax above."""


@dataclass(frozen=True)
class Target:
    num: str  # a benchmark key, possibly with one or more `*`
    den: str | None  # the denominator's key for a ratio target
    op: str  # ≤ < ≥ >
    bound: float
    unit: str  # "", "ms", "s", "MB", "MB/s" or "×"
    line: int  # where it is written, for the report

    @property
    def subject(self) -> str:
        return f"{self.num} / {self.den}" if self.den else self.num

    def __str__(self) -> str:
        unit = self.unit if self.unit == "×" else f" {self.unit}".rstrip()
        return f"{self.subject} {self.op} {self.bound:g}{unit}"


@dataclass(frozen=True)
class Outcome:
    target: Target
    key: str  # the concrete key (or "a / b") the target was checked against
    value: float | None  # None: not measured in this run

    @property
    def met(self) -> bool:
        return self.value is not None and OPS[self.target.op][1](self.value, self._bound())

    def _bound(self) -> float:
        t = self.target
        seconds_key = self.key.endswith("_s")
        if t.unit == "s" and not seconds_key:
            return t.bound * 1000
        if t.unit == "ms" and seconds_key:
            return t.bound / 1000
        return t.bound


def parse_cell(cell: str, row_key: str | None, line: int = 0) -> Target | None:
    """The target a cell holds, None when it holds none (no comparison operator)."""
    text = cell.strip()
    if not any(op in text for op in ("≤", "≥", "<", ">")):
        return None
    m = _CELL.match(text)
    if not m:
        raise TargetError(f"BENCHMARKS.md line {line}: cannot read the target {text!r} (see bench/targets.py)")
    num, den = m["num"] or row_key, m["den"]
    if num is None:
        raise TargetError(f"BENCHMARKS.md line {line}: target {text!r} names no key and its row has none")
    unit = "×" if m["unit"] == "x" else (m["unit"] or "")
    if den is not None and unit != "×":
        raise TargetError(f"BENCHMARKS.md line {line}: the ratio target {text!r} needs the × unit")
    if den is None and unit == "×":
        raise TargetError(f"BENCHMARKS.md line {line}: target {text!r} is a ratio (×) of one key; write `a / b`")
    if den is not None and num.count("*") != den.count("*"):
        raise TargetError(f"BENCHMARKS.md line {line}: both keys of {text!r} need the same number of `*`")
    return Target(num, den, OPS[m["op"]][0], float(m["bound"]), unit, line)


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def parse(markdown: str) -> list[Target]:
    """Every target in the ``target`` columns of the document's tables, each once."""
    targets: dict[tuple[str, str, float, str], Target] = {}
    lines = markdown.splitlines()
    column: int | None = None
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("|"):
            column = None
            continue
        cells = _cells(line)
        if i + 1 < len(lines) and re.fullmatch(r"\|?[\s|:-]+\|?", lines[i + 1].strip()) and column is None:
            heads = [c.lower() for c in cells]
            column = heads.index("target") if "target" in heads else -1
            continue
        if column is None or column < 0 or column >= len(cells) or set(line.strip()) <= set("|:- "):
            continue
        key = _ROW_KEY.search(cells[0])
        target = parse_cell(cells[column], key[1] if key else None, i + 1)
        if target is not None:
            targets.setdefault((target.subject, target.op, target.bound, target.unit), target)
    return list(targets.values())


def _pattern(key: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(key).replace(r"\*", "([A-Za-z0-9]+)") + "$")


def check(targets: Iterable[Target], medians: Mapping[str, float]) -> list[Outcome]:
    """Each target against the medians of one run; a `*` yields one outcome per key it matches."""
    out: list[Outcome] = []
    for t in targets:
        pattern = _pattern(t.num)
        found = False
        for key in sorted(medians):
            m = pattern.match(key)
            if not m:
                continue
            if t.den is None:
                out.append(Outcome(t, key, medians[key]))
                found = True
                continue
            den = t.den
            for part in m.groups():
                den = den.replace("*", part, 1)
            if den in medians and medians[den] > 0:
                out.append(Outcome(t, f"{key} / {den}", medians[key] / medians[den]))
                found = True
        if not found:
            out.append(Outcome(t, t.subject, None))
    return out


def load(path: Path) -> list[Target]:
    return parse(path.read_text())


def report(outcomes: list[Outcome]) -> tuple[list[str], list[str]]:
    """Lines for the misses, and for the targets this run did not measure."""
    misses = [f"MISS {o.key} = {o.value:.4g} (target {o.target}, BENCHMARKS.md line {o.target.line})"
              for o in outcomes if o.value is not None and not o.met]  # fmt: skip
    unmeasured = [f"not measured: {o.target} (line {o.target.line})" for o in outcomes if o.value is None]
    return misses, unmeasured
