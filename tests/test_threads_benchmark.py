"""The parts of ``benchmarks/threads.py`` that must hold whatever the timings: the background load
always stops, the variants and sizes are the ones the docs describe, bad options are refused."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import threads  # noqa: E402


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_background_load_is_stopped_when_the_measurement_fails():
    with pytest.raises(RuntimeError, match="boom"):
        with threads.background_load(2, cap_s=60.0) as record:
            pids = list(record["pids"])
            assert len(pids) == 2 and not any(map(_gone, pids))
            raise RuntimeError("boom")
    assert all(map(_gone, pids))
    assert record["ended_before_kill"] == 0 and record["cpu_s"] > 0 and record["wall_s"] > 0


def test_no_background_load_starts_nothing():
    with threads.background_load(0, cap_s=60.0) as record:
        assert "pids" not in record
    assert record["processes"] == 0


def test_variants_are_distinct_counts_then_passive_above_one():
    variants = threads.make_variants([1, 2, 8], cpus=8, passive=True)
    assert [v.label for v in variants] == ["1", "2", "8 (all)", "2, passive", "8 (all), passive"]
    assert [v.wait for v in variants] == ["default"] * 3 + ["passive"] * 2
    assert [v.label for v in threads.make_variants([1, 2], cpus=2, passive=False)] == ["1", "2 (all)"]


def test_demo_size_is_read_from_the_demo():
    """If the demo's sizes move, the benchmark must follow them, not silently measure old ones."""
    size, source = threads.demo_size()
    assert source == "umilayers.demo.DemoSize.default()"
    assert set(size) == set(threads.DEMO_FALLBACK)


@pytest.mark.parametrize("argv, message", [
    (["--counts", "0,2"], "--counts: expected"),
    (["--counts", "two"], "--counts: expected"),
    (["--sizes", "demo,huge"], "--sizes: expected"),
    (["--rounds", "0"], "--rounds: expected"),
    (["--conditions", "quiet"], "--conditions: expected"),
    (["--block-seconds", "0"], "--block-seconds: expected"),
])
def test_bad_options_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        threads.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
