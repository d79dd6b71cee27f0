"""Guided backpropagation through captum. It rewrites every ReLU's backward pass, so it only means something
when each ReLU is an `nn.ReLU` module (otherwise it would silently be plain gradients)."""

from __future__ import annotations

from captum import attr as ca

from audit.attribution.methods.base import (
    AttributionInputs,
    AttributionMethod,
    ChunkFunction,
)
from audit.attribution.methods.common import hookable
from audit.models.base import Capability


class GuidedBackprop(AttributionMethod):
    name = "guided_backprop"
    title = "Guided backpropagation"
    short_title = "guided backprop"
    reference = (
        "Springenberg, Dosovitskiy, Brox, Riedmiller. Striving for Simplicity: The All Convolutional "
        "Net. ICLR workshop 2015."
    )
    order = 60
    requires = frozenset({Capability.GRADIENTS, Capability.HOOKS, Capability.RELU_MODULES})
    default = True

    def prepare(self, inputs: AttributionInputs) -> ChunkFunction:
        assert inputs.module is not None
        gb = ca.GuidedBackprop(hookable(inputs.forward, inputs.module))
        return lambda xc, tc, _b: gb.attribute(xc, target=tc)
