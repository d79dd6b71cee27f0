"""Attribution maps (captum, batched) and the checks that say whether to trust them."""

from audit.attribution.evaluation import (
    DeletionResult,
    RandomisationResult,
    curve_ends,
    deletion_curve,
    randomisation_test,
    randomisation_tests,
    spearman_rows,
)
from audit.attribution.methods import (
    METHODS,
    AttributionMethod,
    AttributionParams,
    AttributionUnsupported,
    Method,
    attribute,
    baseline_for,
    default_methods,
    fallback_methods,
    find_last_conv,
    positive_mass,
    unsupported_reason,
)

__all__ = [
    "METHODS",
    "AttributionMethod",
    "AttributionParams",
    "AttributionUnsupported",
    "DeletionResult",
    "Method",
    "RandomisationResult",
    "attribute",
    "baseline_for",
    "curve_ends",
    "default_methods",
    "deletion_curve",
    "fallback_methods",
    "find_last_conv",
    "positive_mass",
    "randomisation_test",
    "randomisation_tests",
    "spearman_rows",
    "unsupported_reason",
]
