"""model-audit: audit a trained classifier before anyone trusts it."""

__version__ = "0.1.0"
