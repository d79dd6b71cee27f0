"""Keep freed memory inside the process while a stage runs, and hand it back between stages.

glibc gives blocks above its mmap threshold back to the operating system as soon as they are freed
and trims the top of the heap; explanation probes allocate and free tensors of a few MB thousands
of times, so every new one page-faults afresh. On the demo audit that was 1.2 million minor page
faults and about a third of the attribution stage's time. Pinning the thresholds (the effect of
the MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ environment variables, applied at run time)
lets freed blocks be reused; the cost is that up to `TRIM_THRESHOLD` of freed memory stays with each
of glibc's arenas, and blocks freed in the middle of a heap stay until `release_freed_memory`.
Elsewhere (macOS, musl, Windows) nothing changes.

Measured on ResNet-18 at 224 px (Integrated Gradients, GradientSHAP and saliency, 32 images, twice;
peak above the process's start): glibc's defaults 2.09 GB, these thresholds 2.38 GB and about as
fast as the old 1 GB trim threshold (2.50 GB). PyTorch's transparent-huge-page blocks
(`THP_MEM_ALLOC_ENABLE=1`) on top of a heap that keeps freed blocks took the same run to 3.1-3.4 GB
(a freed hole pins its whole 2 MB page) and are no longer asked for.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 256 << 20
TOP_PAD = 64 << 20

_applied: bool | None = None


def _libc():  # type: ignore[no-untyped-def]
    """glibc on Linux, else None (musl has neither mallopt's options nor malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist
    except (OSError, AttributeError):
        return None
    return libc


def retain_freed_memory() -> bool:
    """Apply the thresholds once per process; True where the C library took them."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    libc = _libc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))
    return all(mallopt(option, value) == 1 for option, value in settings)


def release_freed_memory() -> bool:
    """Return the free pages of every arena to the system (`malloc_trim(0)`), so what one stage freed
    does not count again on top of the next stage's own peak (the next stage's first blocks fault
    afresh, a few milliseconds). True where memory was returned."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return bool(libc.malloc_trim(0))
