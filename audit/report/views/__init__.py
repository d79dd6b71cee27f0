"""Probe-specific report code, one torch-free module per probe section, registered by probe name.

The generic view model (audit.report.viewmodel) knows no probe by name: it asks each probe's view
for its headline rows, its captions for evidence samples and what its section template draws.
Adding a probe's view is one new module here, listed in `VIEW_MODULES`.
"""

from __future__ import annotations

import importlib

from audit.report.views.base import ProbeView, register_view, views_for

VIEW_MODULES = ("predictions", "preprocessing", "background", "embeddings")

for _module in VIEW_MODULES:
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["ProbeView", "register_view", "views_for"]
