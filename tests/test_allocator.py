"""The allocator thresholds are applied on glibc Linux (where the audit runs in CI) and only once."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from audit.execution import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_thresholds_taken_once_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_applied", None)
    assert allocator.retain_freed_memory() is True
    monkeypatch.setattr(allocator, "_apply", lambda: pytest.fail("applied twice"))
    assert allocator.retain_freed_memory() is True


def test_other_platforms_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.retain_freed_memory() is False


FREE_THEN_RELEASE = """
import numpy as np
from audit.execution.allocator import release_freed_memory, retain_freed_memory

def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) >> 10

assert retain_freed_memory()
blocks = [np.ones(1 << 20) for _ in range(20)]  # 20 x 8 MB: below the mmap threshold, so from the heap
pin = np.ones(16)  # after them, so the heap's top stays in use and nothing is trimmed on free
held = rss()
del blocks
kept = rss()
released = release_freed_memory()
print(held - kept, held - rss(), released)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_kept_until_released() -> None:
    out = subprocess.run([sys.executable, "-c", FREE_THEN_RELEASE], capture_output=True, text=True, check=True).stdout.split()
    given_back_on_free, given_back_on_release, released = int(out[0]), int(out[1]), out[2]
    assert given_back_on_free < 40  # MB: kept for reuse while the stage runs
    assert given_back_on_release > 120 and released == "True"  # of the 160 MB freed


def test_release_elsewhere_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.release_freed_memory() is False
