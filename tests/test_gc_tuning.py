"""The serving processes' collector setting (runtime.gc_tuning)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from dynamo_backend_common.runtime import gc_tuning


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    saved = gc.get_threshold()
    monkeypatch.setattr(gc_tuning, "_tuned", False)
    gc.set_threshold(700, saved[1], saved[2])
    try:
        yield
    finally:
        gc.set_threshold(*saved)


def test_raises_the_first_threshold_once(fresh: None) -> None:
    assert gc_tuning.tune_for_serving()
    assert gc.get_threshold()[0] == gc_tuning.GEN0_THRESHOLD
    gc.set_threshold(700)
    assert not gc_tuning.tune_for_serving()  # once per process
    assert gc.get_threshold()[0] == 700


@pytest.mark.parametrize("threshold", [0, 100_000])
def test_leaves_an_off_or_larger_setting(fresh: None, threshold: int) -> None:
    gc.set_threshold(threshold)
    assert not gc_tuning.tune_for_serving()
    assert gc.get_threshold()[0] == threshold


def test_env_turns_it_off(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_GC_TUNING", "0")
    assert not gc_tuning.tune_for_serving()
    assert gc.get_threshold()[0] == 700
