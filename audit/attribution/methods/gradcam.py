"""Grad-CAM through captum: the ReLU'd gradient-weighted class map of a layer, upsampled bilinearly to the input."""

from __future__ import annotations

from captum import attr as ca
from torch import Tensor

from audit.attribution.methods.base import (
    AttributionInputs,
    AttributionMethod,
    ChunkFunction,
)
from audit.attribution.methods.common import (
    AttributionUnsupported,
    find_last_conv,
    target_layer,
)
from audit.models.base import Capability


class GradCam(AttributionMethod):
    name = "gradcam"
    title = "Grad-CAM"
    short_title = "Grad-CAM"
    reference = (
        "Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra. Grad-CAM: Visual Explanations from Deep "
        "Networks via Gradient-based Localization. ICCV 2017."
    )
    order = 50
    requires = frozenset({Capability.GRADIENTS, Capability.HOOKS})
    needs_layer = True
    reduction = "first"
    signed = False
    default = True

    def prepare(self, inputs: AttributionInputs) -> ChunkFunction:
        module, params = inputs.module, inputs.params
        assert module is not None
        height, width = inputs.x.shape[2], inputs.x.shape[3]
        gc = ca.LayerGradCam(inputs.forward, target_layer(module, params))

        def gradcam(xc: Tensor, tc: Tensor, _b: Tensor | None) -> Tensor:
            coarse = gc.attribute(xc, target=tc, relu_attributions=True)
            if not isinstance(coarse, Tensor) or coarse.ndim != 4:
                raise AttributionUnsupported(
                    f"Grad-CAM layer {params.layer or find_last_conv(module)!r} does not output an N x C x H x W map"
                )
            return ca.LayerAttribution.interpolate(coarse, (height, width), "bilinear")

        return gradcam
