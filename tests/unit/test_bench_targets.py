"""The target syntax of BENCHMARKS.md and `python -m bench --check` (bench/targets.py)."""

# ruff: noqa: RUF001, RUF003  (× is the ratio unit of the syntax under test)
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import targets
from bench.targets import TargetError, parse, parse_cell

REPO = Path(__file__).resolve().parents[2]

TABLES = """\
| benchmark (key) | 64 MiB | target |
|---|---:|---:|
| `snapshot_create_*` (what) | 2.2 ms | ≤ 3 ms |
| `clone_*` | 2.4 ms | ≤ 3 ms — met |
| `clone_batch_100` | 74 ms | <= 500 ms (note) |
| `overlay_write` | 0.4 ms | |
| `release_*` | 51 ms | (background) |

| operation | boxvm/BoxLite | target |
|---|---:|---:|
| `clone` | 1.07 | `boxvm_clone / boxlite_clone` ≤ 0.5× — **not met** |
| `scale` | 1.04 | `boxvm_1000boxes_* / boxvm_1boxes_*` ≤ 1.5x |

| no target column | median |
|---|---:|
| `cold_start` | ≤ 6272 ms |
"""


def test_parse_reads_every_target_cell_and_only_those() -> None:
    got = {str(t): t.line for t in parse(TABLES)}
    assert got == {
        "snapshot_create_* ≤ 3 ms": 3,
        "clone_* ≤ 3 ms": 4,
        "clone_batch_100 ≤ 500 ms": 5,
        "boxvm_clone / boxlite_clone ≤ 0.5×": 11,
        "boxvm_1000boxes_* / boxvm_1boxes_* ≤ 1.5×": 12,
    }


@pytest.mark.parametrize(
    "cell",
    [
        "≤ three ms",  # no number
        "≤ 3 seconds",  # unknown unit
        "≤ 0.5×",  # a ratio of one key
        "`a / b` ≤ 3 ms",  # a ratio without ×
        "`a_* / b` ≤ 2×",  # the wildcard on one side only
        "≈ 3 ms > 2",  # junk before the operator
    ],
)
def test_a_cell_with_an_operator_that_does_not_parse_is_an_error(cell: str) -> None:
    with pytest.raises(TargetError, match="line 7"):
        parse_cell(cell, "row_key", 7)


def test_a_target_needs_a_key() -> None:
    with pytest.raises(TargetError, match="names no key"):
        parse_cell("≤ 3 ms", None, 1)


def test_check_expands_wildcards_one_segment_at_a_time() -> None:
    medians = {
        "clone_64m": 2.4, "clone_2g": 3.5, "clone_batch_100": 74.0, "clone_from_snapshot_64m": 9.0,
        "boxvm_clone": 6.6, "boxlite_clone": 6.1, "boxvm_1000boxes_x": 3.0, "boxvm_1boxes_x": 3.0,
        "boxvm_1000boxes_y": 4.0, "boxvm_1boxes_y": 2.0,
    }  # fmt: skip
    outcomes = targets.check(parse(TABLES), medians)
    by_key = {o.key: (o.value, o.met) for o in outcomes}
    assert by_key["clone_64m"] == (2.4, True)
    assert by_key["clone_2g"] == (3.5, False)
    assert "clone_from_snapshot_64m" not in by_key  # `*` is one name segment, not any text
    assert by_key["clone_batch_100"] == (74.0, True)
    assert by_key["boxvm_clone / boxlite_clone"][1] is False
    assert by_key["boxvm_1000boxes_x / boxvm_1boxes_x"] == (1.0, True)
    assert by_key["boxvm_1000boxes_y / boxvm_1boxes_y"] == (2.0, False)
    assert by_key["snapshot_create_*"] == (None, False)  # not measured
    misses, unmeasured = targets.report(outcomes)
    assert len(misses) == 3 and all(m.startswith("MISS ") for m in misses)
    assert unmeasured == ["not measured: snapshot_create_* ≤ 3 ms (line 3)"]


@pytest.mark.parametrize(
    ("cell", "key", "value", "met"),
    [
        ("≤ 2 s", "base_disk", 1999.0, True),  # a ms key against a bound in seconds
        ("≤ 2 s", "base_disk", 2001.0, False),
        ("≤ 100 ms", "image_build_default_s", 0.1, True),  # a seconds key against a bound in ms
        ("< 100 MB", "rss_mb", 100.0, False),  # strict
        ("≥ 0.95×", None, 0.95, True),
        ("> 0.95×", None, 0.95, False),
    ],
)
def test_bounds_compare_in_the_keys_unit(cell: str, key: str | None, value: float, met: bool) -> None:
    if key is None:
        target = parse_cell(f"`a / b` {cell}", None)
        medians = {"a": value, "b": 1.0}
    else:
        target = parse_cell(cell, key)
        medians = {key: value}
    assert target is not None
    [outcome] = targets.check([target], medians)
    assert outcome.met is met


def test_benchmarks_md_parses_and_names_keys_the_bench_writes() -> None:
    found = targets.load(REPO / "BENCHMARKS.md")
    assert len(found) >= 20
    subjects = {t.subject for t in found}
    assert {"clone_batch_100", "live_snapshot_pause_*", "export_rest / export_local"} <= subjects


def _run_check(tmp_path: Path, medians: dict[str, float]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"medians_ms": medians}))
    return subprocess.run(
        [sys.executable, "-m", "bench", "--check", "--json", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_bench_check_exits_nonzero_and_lists_each_miss(tmp_path: Path) -> None:
    bad = _run_check(tmp_path, {"clone_batch_100": 600.0, "live_snapshot_pause_4g": 60.0, "export_rest": 1.0})
    assert bad.returncode == 1
    assert "MISS clone_batch_100 = 600" in bad.stderr and "MISS live_snapshot_pause_4g = 60" in bad.stderr
    good = _run_check(tmp_path, {"clone_batch_100": 70.0, "live_snapshot_pause_4g": 12.0})
    assert good.returncode == 0, good.stderr
    assert "2 met, 0 missed" in good.stdout


def test_bench_check_without_a_run_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.run import check

    assert check(tmp_path / "none.json") == 2 and "make bench" in capsys.readouterr().err
    (tmp_path / "other.json").write_text("[]")
    assert check(tmp_path / "other.json") == 2 and "no medians_ms" in capsys.readouterr().err


def test_after_a_full_run_an_unmeasured_target_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.run import check

    run = tmp_path / "run.json"
    run.write_text(json.dumps({"only": "state", "medians_ms": {"clone_batch_100": 70.0}}))
    assert check(run) == 0  # one group: the other targets are listed, not failed
    assert "not measured: live_snapshot_pause_* ≤ 50 ms" in capsys.readouterr().out
    run.write_text(json.dumps({"only": None, "medians_ms": {"clone_batch_100": 70.0}}))
    assert check(run) == 1  # a full run that lacks a key: a typo in BENCHMARKS.md, or a bench gone
    assert "not measured: live_snapshot_pause_* ≤ 50 ms" in capsys.readouterr().err
