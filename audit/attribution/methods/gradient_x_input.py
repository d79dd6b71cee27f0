"""Gradient x input: the target score's input gradient times the input, through captum."""

from __future__ import annotations

from captum import attr as ca

from audit.attribution.methods.base import (
    AttributionInputs,
    AttributionMethod,
    ChunkFunction,
)
from audit.models.base import Capability


class GradientXInput(AttributionMethod):
    name = "gradient_x_input"
    title = "Gradient x input"
    short_title = "grad × input"
    reference = (
        "Shrikumar, Greenside, Shcherbina, Kundaje. Not Just a Black Box: Learning Important Features "
        "Through Propagating Activation Differences. arXiv:1605.01713, 2016."
    )
    order = 20
    requires = frozenset({Capability.GRADIENTS})
    default = True

    def prepare(self, inputs: AttributionInputs) -> ChunkFunction:
        ixg = ca.InputXGradient(inputs.forward)
        return lambda xc, tc, _b: ixg.attribute(xc, target=tc)
