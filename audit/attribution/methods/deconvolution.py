"""Deconvolution through captum. Like guided backpropagation it rewrites every ReLU's backward pass, so it
needs each ReLU to be an `nn.ReLU` module."""

from __future__ import annotations

from captum import attr as ca

from audit.attribution.methods.base import (
    AttributionInputs,
    AttributionMethod,
    ChunkFunction,
)
from audit.attribution.methods.common import hookable
from audit.models.base import Capability


class Deconvolution(AttributionMethod):
    name = "deconvolution"
    title = "Deconvolution"
    short_title = "deconvolution"
    reference = "Zeiler, Fergus. Visualizing and Understanding Convolutional Networks. ECCV 2014."
    order = 70
    requires = frozenset({Capability.GRADIENTS, Capability.HOOKS, Capability.RELU_MODULES})
    default = True

    def prepare(self, inputs: AttributionInputs) -> ChunkFunction:
        assert inputs.module is not None
        dc = ca.Deconvolution(hookable(inputs.forward, inputs.module))
        return lambda xc, tc, _b: dc.attribute(xc, target=tc)
