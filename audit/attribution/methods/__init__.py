"""One registry of attribution methods, each explaining a target class for a batch, as 2-D maps.

Each method is one file here defining one `AttributionMethod` subclass (`base.py`) that declares what it
needs (capabilities, a layer, a baseline, random draws), how its channels reduce to a map, its titles, whether
it is a default or a fallback method, and its display order. Every module of this package is imported below,
and defining the class registers it: adding a method is adding a file. `common.py` holds what methods share.

Hook-based methods (Grad-CAM, guided backpropagation, deconvolution, guided Grad-CAM, LRP), saliency,
gradient x input and feature ablation run through captum. The methods that evaluate each input many times, or
whose captum bookkeeping cost more than the model, are computed here with captum's exact semantics, tested
equal to direct captum calls: Integrated Gradients, SmoothGrad, GradientSHAP, DeepLift, occlusion and
KernelSHAP. Inputs are processed in chunks so a large sample never holds one giant graph (GPU memory was the
most common complaint about attribution tools).

Methods that rewrite ReLU backward passes or hook every nonlinearity only mean something when the model is
built the way they assume: `unsupported_reason` refuses them otherwise, and `attribute` checks again before
running, so they are never reported as if they had run on a model where they silently degrade.
"""

from __future__ import annotations

import importlib
import pkgutil

from audit.attribution.methods.base import (
    METHODS,
    AttributionInputs,
    AttributionMethod,
    ChunkFunction,
    attribute,
    default_methods,
    fallback_methods,
    method_spec,
    unsupported_reason,
)
from audit.attribution.methods.common import (
    AttributionParams,
    AttributionUnsupported,
    Forward,
    Normalisation,
    Reduction,
    baseline_for,
    find_last_conv,
    gaussian_blur,
    grid_mask,
    input_range,
    occlusion_geometry,
    positive_mass,
    seeded,
)
from audit.attribution.methods.occlusion import occlusion_boxes

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

Method = AttributionMethod  # the name other modules and older code use for a method's declaration
GRADIENT_METHODS = default_methods()
PERTURBATION_FALLBACK = fallback_methods()

__all__ = [
    "GRADIENT_METHODS",
    "METHODS",
    "PERTURBATION_FALLBACK",
    "AttributionInputs",
    "AttributionMethod",
    "AttributionParams",
    "AttributionUnsupported",
    "ChunkFunction",
    "Forward",
    "Method",
    "Normalisation",
    "Reduction",
    "attribute",
    "baseline_for",
    "default_methods",
    "fallback_methods",
    "find_last_conv",
    "gaussian_blur",
    "grid_mask",
    "input_range",
    "method_spec",
    "occlusion_boxes",
    "occlusion_geometry",
    "positive_mass",
    "seeded",
    "unsupported_reason",
]
