"""Where a run came from: tool and library versions, platform, device, seed, timings."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Any

PACKAGES = ("torch", "torchvision", "onnx", "onnxruntime", "onnxruntime-gpu", "onnx2torch", "captum", "numpy",
            "pandas", "scikit-learn", "scipy", "weasyprint", "jinja2")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def environment(device: str, seed: int) -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": package_versions(),
        "device": device,
        "seed": seed,
        "argv": sys.argv[1:],
    }
