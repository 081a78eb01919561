"""Periodic malloc_trim(0) on the worker's clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from proxy.ops import heap


def test_the_heap_is_trimmed_every_interval_on_the_given_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(heap, "malloc_trim", lambda: lambda: calls.append(1) or 1)
    clock = Clock()
    call = heap.start_trimming(clock, 10.0)
    assert call is not None and calls == []  # not at start: nothing to give back yet
    clock.advance(10.0)
    clock.advance(10.0)
    assert len(calls) == 2
    call.stop()


def test_no_trimming_when_off_or_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    assert heap.start_trimming(Clock(), 0) is None
    monkeypatch.setattr(heap, "malloc_trim", lambda: None)
    assert heap.start_trimming(Clock(), 10.0) is None


def test_glibc_malloc_trim_is_found_and_runs() -> None:
    trim = heap.malloc_trim()
    assert trim is not None  # the test machine runs glibc
    assert trim() in (0, 1)
