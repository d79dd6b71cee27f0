"""Saliency: the magnitude of the target score's gradient with respect to each input pixel, through captum."""

from __future__ import annotations

from captum import attr as ca

from audit.attribution.methods.base import (
    AttributionInputs,
    AttributionMethod,
    ChunkFunction,
)
from audit.models.base import Capability


class Saliency(AttributionMethod):
    name = "saliency"
    title = "Saliency (gradient magnitude)"
    short_title = "saliency"
    reference = (
        "Simonyan, Vedaldi, Zisserman. Deep Inside Convolutional Networks: Visualising Image "
        "Classification Models and Saliency Maps. ICLR workshop 2014."
    )
    order = 10
    requires = frozenset({Capability.GRADIENTS})
    reduction = "magnitude"
    signed = False
    default = True

    def prepare(self, inputs: AttributionInputs) -> ChunkFunction:
        sal = ca.Saliency(inputs.forward)
        return lambda xc, tc, _b: sal.attribute(xc, target=tc, abs=True)
