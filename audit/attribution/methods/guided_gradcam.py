"""Guided Grad-CAM through captum: guided backpropagation times the upsampled Grad-CAM map of a layer."""

from __future__ import annotations

from captum import attr as ca
from torch import Tensor

from audit.attribution.methods.base import (
    AttributionInputs,
    AttributionMethod,
    ChunkFunction,
)
from audit.attribution.methods.common import (
    AttributionParams,
    AttributionUnsupported,
    hookable,
    target_layer,
)
from audit.models.base import Capability


class GuidedGradCam(AttributionMethod):
    name = "guided_gradcam"
    title = "Guided Grad-CAM"
    short_title = "guided Grad-CAM"
    reference = (
        "Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra. Grad-CAM: Visual Explanations from Deep "
        "Networks via Gradient-based Localization. ICCV 2017."
    )
    order = 80
    requires = frozenset({Capability.GRADIENTS, Capability.HOOKS, Capability.RELU_MODULES})
    needs_layer = True
    default = True

    def passes(self, params: AttributionParams, height: int, width: int) -> tuple[float, float]:
        return 2.0, 0.0  # Grad-CAM and guided backpropagation

    def prepare(self, inputs: AttributionInputs) -> ChunkFunction:
        module = inputs.module
        assert module is not None
        ggc = ca.GuidedGradCam(hookable(inputs.forward, module), target_layer(module, inputs.params))

        def guided_gradcam(xc: Tensor, tc: Tensor, _b: Tensor | None) -> Tensor:
            out = ggc.attribute(xc, target=tc, interpolate_mode="bilinear")
            if out.numel() == 0:  # captum swallows interpolation failures and returns an empty tensor
                raise AttributionUnsupported("Guided Grad-CAM could not upsample the layer's map to the input")
            return out

        return guided_gradcam
