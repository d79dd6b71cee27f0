"""Probes compute evidence; each module registers one probe. Import order is report order."""

from audit.probes import predictions  # noqa: F401
