"""The allocator thresholds are applied on glibc Linux (where the audit runs in CI) and only once."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

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


def _fresh_python(code: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != allocator.HUGE_PAGES_VARIABLE} | env
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True).stdout.strip()


ADVISE_THEN_ALLOCATE = """
import os
from audit.execution.allocator import advise_huge_pages
taken = advise_huge_pages()
import torch
block = torch.ones(16 << 20)  # 64 MB
huge = int(open("/proc/self/smaps_rollup").read().split("AnonHugePages:")[1].split()[0])
print(taken, os.environ["THP_MEM_ALLOC_ENABLE"], huge > 0, advise_huge_pages())
"""


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux /proc only")
def test_huge_pages_advised_before_torch_loads_unless_the_environment_says_no() -> None:
    advised = "[madvise]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    taken, value, huge, again = _fresh_python(ADVISE_THEN_ALLOCATE).split()
    assert (taken, value, again) == ("True", "1", "False")  # too late once torch is loaded
    if advised:  # huge pages only where asked for: the advice is what gives them
        assert huge == "True"
    taken, value, huge, _ = _fresh_python(ADVISE_THEN_ALLOCATE, THP_MEM_ALLOC_ENABLE="0").split()
    assert (taken, value) == ("False", "0")
    if advised:
        assert huge == "False"
