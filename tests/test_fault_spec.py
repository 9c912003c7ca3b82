"""DMA_FAULT_AT is read when the fault hook is used, not when dma_jax.faults is imported (fast, in-process).

`os.kill` is replaced by a recorder, so an armed hook signals nothing here; the kills themselves are
exercised end to end in tests/test_faults.py.
"""

import os
import signal

import pytest

from dma_jax import faults
from dma_jax.errors import DmaError


@pytest.fixture
def kills(monkeypatch):
    """The (pid, signal) of every os.kill the hook makes; DMA_FAULT_AT starts unset."""
    monkeypatch.delenv("DMA_FAULT_AT", raising=False)
    sent = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    return sent


def test_spec_set_after_import_arms_the_hook(kills, monkeypatch):
    assert not faults.armed("x")
    monkeypatch.setenv("DMA_FAULT_AT", "x:2")
    assert faults.armed("x")
    assert not faults.armed("y")
    monkeypatch.delenv("DMA_FAULT_AT")
    assert not faults.armed("x")
    faults.maybe_fault("x")
    assert kills == []


def test_signal_at_the_nth_event_only(kills, monkeypatch):
    monkeypatch.setenv("DMA_FAULT_AT", "x:3:TERM")
    for _ in range(2):
        faults.maybe_fault("x")
        faults.maybe_fault("y")  # other events do not count
    assert kills == []
    faults.maybe_fault("x")
    assert kills == [(os.getpid(), signal.SIGTERM)]
    faults.maybe_fault("x")
    assert kills == [(os.getpid(), signal.SIGTERM)]


def test_default_signal_is_sigkill_and_a_new_value_starts_a_new_count(kills, monkeypatch):
    monkeypatch.setenv("DMA_FAULT_AT", "x:2")
    faults.maybe_fault("x")
    monkeypatch.setenv("DMA_FAULT_AT", "x:2:KILL")
    faults.maybe_fault("x")
    assert kills == []
    faults.maybe_fault("x")
    assert kills == [(os.getpid(), signal.SIGKILL)]


@pytest.mark.parametrize("spec", ["x", "x:0", "x:two", "x:1:HUP", "x:1:TERM:again"])
def test_malformed_spec_raises_naming_the_value(kills, monkeypatch, spec):
    monkeypatch.setenv("DMA_FAULT_AT", spec)
    for use in (faults.armed, faults.maybe_fault):
        with pytest.raises(DmaError, match=f"DMA_FAULT_AT='{spec}': expected"):
            use("x")
    assert kills == []
