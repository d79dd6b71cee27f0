"""Should an attribution map be trusted? A sanity check and a faithfulness measure.

- Sanity (Adebayo et al. 2018, "Sanity Checks for Saliency Maps", NeurIPS): a map that explains
  the model must change when the model's weights are destroyed. Methods that keep producing the
  same picture behave like edge detectors of the input, whatever the model learnt.
- Faithfulness (Samek et al. 2017, "Evaluating the Visualization of What a Deep Neural Network Has
  Learned", IEEE TNNLS; Petsiuk et al. 2018, "RISE", BMVC deletion metric): removing the pixels a
  map calls most relevant first should make the class probability fall faster than removing
  pixels in random order.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from audit.attribution.methods import (
    METHODS,
    AttributionParams,
    Normalisation,
    attribute,
    seeded,
)

MapFunction = Callable[[Callable[[Tensor], Tensor], Tensor, Tensor, nn.Module], np.ndarray]


@dataclass
class RandomisationResult:
    """Cascading model-parameter randomisation of one method.

    `layers`: the cascade's steps in the order they were re-initialised (output side first), each
    named by its blocks (e.g. "fc", "layer4", "bn1 + conv1").
    `step_correlations[k]`: mean over samples of the Spearman rank correlation between the original
    maps and the maps after re-initialising the steps `layers[: k + 1]`; `step_sample_correlations[k]` holds
    the per-sample values. `final_correlation` / `sample_correlations`: after the last step.
    High final correlation = the method ignores the weights (untrustworthy).
    """

    method: str
    layers: list[str]
    step_correlations: np.ndarray
    step_sample_correlations: np.ndarray
    final_correlation: float
    sample_correlations: np.ndarray


@dataclass
class DeletionResult:
    """Deletion curve: target-class probability as the most relevant pixels are removed.

    `fractions` (steps + 1,) of pixels removed, 0 to 1; `curves` (N, steps + 1) probabilities;
    `auc` (N,) trapezoid area under each curve; `mean_auc` their mean. Lower than the random-order
    control = the map ranks pixels the model actually relies on.
    """

    order: str
    fractions: np.ndarray
    curves: np.ndarray
    auc: np.ndarray
    mean_auc: float
    passes: int = 0  # images that went through the model (rows sharing a removal share one)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each row of `a` with the same row of `b` (ties averaged).

    A constant row has no ranking: two constant rows count as 1 (same non-information), one constant
    row against a varying one as 0, so a map that collapsed to zeros reads as fully changed.
    """
    return _rank_correlation(_centred_ranks(a), _centred_ranks(b))


def _centred_ranks(a: np.ndarray) -> np.ndarray:
    ranks = rankdata(np.asarray(a, dtype=np.float64).reshape(len(a), -1), axis=1)
    return ranks - ranks.mean(axis=1, keepdims=True)


def _rank_correlation(ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
    va = (ra**2).sum(axis=1)
    vb = (rb**2).sum(axis=1)
    den = np.sqrt(va * vb)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (ra * rb).sum(axis=1) / den
    both_constant = (va == 0) & (vb == 0)
    return np.where(den > 0, corr, np.where(both_constant, 1.0, 0.0))


def _parameterised_layers(module: nn.Module, forward: Callable[[Tensor], Tensor], x: Tensor) -> list[str]:
    """Layers owning parameters, in the order a forward pass first calls them (registration order
    when the module takes no hooks, e.g. TorchScript)."""
    owners = {name: m for name, m in module.named_modules() if next(m.parameters(recurse=False), None) is not None}
    called: dict[str, None] = {}
    handles = []
    try:
        for name, m in owners.items():

            def record(*_args: object, _name: str = name) -> None:
                called.setdefault(_name, None)

            handles.append(m.register_forward_hook(record))
    except RuntimeError:
        for handle in handles:
            handle.remove()
        return list(owners)
    try:
        with torch.no_grad():
            forward(x)
    finally:
        for handle in handles:
            handle.remove()
    return list(called) or list(owners)


def _reinitialise(layer: nn.Module) -> None:
    """Fresh random weights as at construction; layers without reset_parameters get a normal draw of matching scale."""
    reset = getattr(layer, "reset_parameters", None)
    with torch.no_grad():
        if callable(reset):
            reset()
            return
        for p in layer.parameters(recurse=False):
            scale = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.02
            p.normal_(0.0, scale)


MAX_STEPS = 6  # cascading steps of the randomisation test: the head, then blocks, down to the input


def _group_root(module: nn.Module) -> str:
    """The module whose children are the model's blocks: below wrappers (input layout, output
    selection) that own no parameters and hold the whole model in one child."""
    prefix, current = "", module
    while next(current.parameters(recurse=False), None) is None:
        children = [(n, c) for n, c in current.named_children() if next(c.parameters(), None) is not None]
        if len(children) != 1:
            break
        name, current = children[0]
        prefix = f"{prefix}{name}."
    return prefix


def cascade_steps(module: nn.Module, layers: Sequence[str], max_steps: int | None = MAX_STEPS) -> list[tuple[str, list[str]]]:
    """The cascade as (label, layers) steps, output side first: `layers` (parameterised layers in
    the order a forward pass calls them) reversed and cut where the block changes. Blocks are the
    model's top-level modules; while there are fewer than `max_steps`, the largest block is cut into
    its own children (MobileNet's one `features` block into its stages). The head stays a step of
    its own and the blocks below it are merged, input side first, until at most `max_steps` remain
    (ResNet-18: fc, layer4, layer3, layer2, layer1, bn1 + conv1). None: one step per layer, Adebayo
    et al.'s full per-layer cascade. The layers are re-initialised in the same order whatever the
    steps, so the fully randomised model, on which the verdict is taken, is the same at any
    granularity."""
    order = list(reversed(layers))
    if max_steps is None:
        return [(name, [name]) for name in order]
    root = _group_root(module)
    parts = {name: (name[len(root):] if name.startswith(root) else name).split(".") for name in order}

    def cut(names: list[str], depth: int) -> list[tuple[str, list[str], int]]:
        runs: list[tuple[str, list[str], int]] = []
        for name in names:
            key = ".".join(parts[name][:depth])
            if runs and runs[-1][0] == key:
                runs[-1][1].append(name)
            else:
                runs.append((key, [name], depth))
        return runs

    runs = cut(order, 1)
    while len(runs) < max_steps:
        finer = {i: cut(names, depth + 1) for i, (_, names, depth) in enumerate(runs)
                 if any(len(parts[n]) > depth + 1 for n in names)}
        finer = {i: r for i, r in finer.items() if len(r) > 1}
        if not finer:
            break
        i = max(finer, key=lambda k: len(runs[k][1]))
        runs[i : i + 1] = finer[i]
    if len(runs) <= max_steps:
        return [(key, names) for key, names, _ in runs]
    head, rest = runs[0], runs[1:]
    sizes = [len(c) for c in np.array_split(np.arange(len(rest)), max(1, max_steps - 1))][::-1]  # larger chunks at the input side
    steps, start = [(head[0], head[1])], 0
    for size in sizes:
        chunk = rest[start : start + size]
        steps.append((" + ".join(key for key, _, _ in chunk), [name for _, names, _ in chunk for name in names]))
        start += size
    return steps


def randomisation_test(
    module: nn.Module,
    make_forward: Callable[[nn.Module], Callable[[Tensor], Tensor]],
    method: str | MapFunction,
    x: Tensor,
    target: Tensor,
    params: AttributionParams,
    normalisation: Normalisation = ((0.0,), (1.0,)),
    layers: int | None = None,
    seed: int = 0,
    max_steps: int | None = MAX_STEPS,
) -> RandomisationResult:
    """Adebayo et al. 2018 cascading model-parameter randomisation of one method (see
    `randomisation_tests`); a failure of the method is raised."""
    result = randomisation_tests(module, make_forward, [method], x, target, params, normalisation, layers, seed, max_steps)
    outcome = next(iter(result.values()))
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def randomisation_tests(
    module: nn.Module,
    make_forward: Callable[[nn.Module], Callable[[Tensor], Tensor]],
    methods: Sequence[str | MapFunction],
    x: Tensor,
    target: Tensor,
    params: AttributionParams,
    normalisation: Normalisation = ((0.0,), (1.0,)),
    layers: int | None = None,
    seed: int = 0,
    max_steps: int | None = MAX_STEPS,
) -> dict[str, RandomisationResult | Exception]:
    """Adebayo et al. 2018 cascading model-parameter randomisation, on a deep copy of `module`.

    The model is re-initialised from the output down, cumulatively, in at most `max_steps` steps
    at block granularity (`cascade_steps`; `layers` = how many of the steps to take, None = all, so
    the last step leaves the whole model randomised), recomputing the maps of all of `x` in one
    call per method after each step and comparing them with the original maps by per-sample
    Spearman rank correlation of the flattened maps (of |map| for magnitude methods, whose sign
    carries no meaning). One step per layer (max_steps=None) cost 42 recomputations on a ResNet-18
    for the same verdict. `make_forward(m)` builds the score function over a module (the probe's
    `lambda t: interpretation.torch_scores(m(t))`). Each method is a registered name or a function
    (forward, x, target, module) -> (N, H, W) maps. All methods see the same randomised weights at
    each step (one copy, one re-initialisation per step; a method's own random draws are seeded
    apart and do not disturb them), so the result of a method is the same as when it is tested
    alone. The caller's module is never touched; the result is deterministic given `seed` (and
    `params.seed` for stochastic methods). A method that fails maps to its error.
    """
    def maps_of(method: str | MapFunction, m: nn.Module) -> np.ndarray:
        if isinstance(method, str):
            maps = attribute(method, make_forward(m), x, target, params, normalisation, module=m)
            return np.abs(maps) if not METHODS[method].signed else maps
        return np.asarray(method(make_forward(m), x, target, m), dtype=np.float32)

    named = {method if isinstance(method, str) else getattr(method, "__name__", "custom"): method for method in methods}
    model = copy.deepcopy(module)
    steps = cascade_steps(model, _parameterised_layers(model, make_forward(model), x[:1]), max_steps)
    if layers is not None:
        steps = steps[: max(0, layers)]
    if not steps:
        raise ValueError("the model has no parameterised layers to randomise")
    failed: dict[str, Exception] = {}
    original: dict[str, np.ndarray] = {}
    per_step: dict[str, list[np.ndarray]] = {name: [] for name in named}
    for name, method in named.items():
        try:
            original[name] = _centred_ranks(maps_of(method, model))
        except Exception as exc:  # noqa: BLE001 - one method failing must not stop the others
            failed[name] = exc
    submodules = dict(model.named_modules())
    with seeded(seed, x.device):
        for _, step_layers in steps:
            for layer_name in step_layers:
                _reinitialise(submodules[layer_name])
            for name, method in named.items():
                if name in failed:
                    continue
                try:
                    per_step[name].append(_rank_correlation(original[name], _centred_ranks(maps_of(method, model))))
                except Exception as exc:  # noqa: BLE001
                    failed[name] = exc
    labels = [label for label, _ in steps]
    results: dict[str, RandomisationResult | Exception] = {}
    for name in named:
        if name in failed:
            results[name] = failed[name]
            continue
        stacked = np.stack(per_step[name])
        results[name] = RandomisationResult(method=name, layers=labels, step_correlations=stacked.mean(axis=1),
                                            step_sample_correlations=stacked, final_correlation=float(stacked[-1].mean()),
                                            sample_correlations=stacked[-1])
    return results


def descending_order(scores: np.ndarray) -> np.ndarray:
    """Per row, the column indices from the largest value to the smallest, ties in column order, NaN
    last: `argsort(-scores, stable)`, exactly, by two 16-bit radix passes over an order-preserving
    integer key: half the time of a comparison sort on 48 x 48 maps, where sorting was a tenth of
    the deletion curves' cost."""
    values = np.nan_to_num(np.asarray(scores, dtype=np.float32), nan=-np.inf) + np.float32(0.0)  # -0.0 ties with 0.0
    bits = values.view(np.uint32)
    ascending = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))  # integer order = float order
    key = ~ascending  # largest value first
    low = np.argsort((key & 0xFFFF).astype(np.uint16), axis=1, kind="stable")
    high = np.argsort(np.take_along_axis(key >> 16, low, axis=1).astype(np.uint16), axis=1, kind="stable")
    return np.take_along_axis(low, high, axis=1)


def curve_ends(forward_probs: Callable[[Tensor], Tensor], x: Tensor, fill: Tensor, target: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Target-class probabilities of the intact inputs and of the inputs entirely replaced by
    `fill`: the two ends every deletion curve of the batch shares (`deletion_curve(ends=...)`)."""
    n = x.shape[0]
    target = torch.as_tensor(target, dtype=torch.long).reshape(-1).cpu()
    with torch.no_grad():
        probs = torch.as_tensor(forward_probs(torch.cat([x.detach(), fill.detach().to(x).expand_as(x)]))).cpu()
    picked = probs.gather(1, torch.cat([target, target])[:, None])[:, 0].double().numpy()
    return picked[:n], picked[n:]


def removal_classes(ranking: np.ndarray, removed: np.ndarray, images: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per step k: the rows to run (one per distinct image and set of removed pixels) and, per row,
    which of them it reads. Sets are compared by a Zobrist hash (XOR of a random 64-bit key per
    pixel, accumulated along each ranking), so equal sets are found without sorting them; distinct
    sets collide with probability 2^-64 per pair."""
    keys = np.random.default_rng(0x5EED).bit_generator.random_raw(ranking.shape[1]).astype(np.uint64)
    counts = np.asarray(removed, dtype=np.int64)
    hashes = np.zeros((len(ranking), len(counts)), dtype=np.uint64)
    for start in range(0, len(ranking), 32):  # bounded memory: 32 rows of 64-bit keys at a time
        acc = np.bitwise_xor.accumulate(keys[ranking[start : start + 32]], axis=1)
        hashes[start : start + 32] = np.where(counts > 0, acc[:, np.maximum(counts - 1, 0)], np.uint64(0))
    image_key = np.asarray(images, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    out = {}
    for k in range(len(counts)):
        _, first, inverse = np.unique(hashes[:, k] ^ image_key, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # run rows in their own order
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        out[k] = (first[order], rank[inverse.reshape(-1)])
    return out


def deletion_curve(
    forward_probs: Callable[[Tensor], Tensor],
    x: Tensor,
    target: Tensor,
    maps: np.ndarray | Tensor,
    steps: int = 16,
    fill: Tensor | None = None,
    order: Literal["attribution", "random"] = "attribution",
    seed: int = 0,
    batch_size: int = 64,
    ends: tuple[np.ndarray, np.ndarray] | None = None,
    images: np.ndarray | None = None,
) -> DeletionResult:
    """Deletion metric (Samek et al. 2017; Petsiuk et al. 2018): remove pixels, watch the class probability.

    Pixels (all channels at once) are replaced by `fill` (a baseline image shaped like `x`, e.g.
    `baseline_for(x, "blur")`; None = zeros in the model's input space) in `steps` equal fractions,
    most relevant first (`order="attribution"`, ties in raster order) or in a seeded random order
    (`order="random"`, the control). The area under the target-class probability curve over the
    fraction removed in [0, 1] is computed per sample; lower = more faithful. Whole steps of the
    batch go through `forward_probs` together (about `batch_size` images a call), so any forward
    function works (onnxruntime wrappers included) and there is no per-sample loop. `ends`, when
    given, are the target-class probabilities of the intact and of the fully filled inputs: the
    first and last points of every curve of a batch, whatever the map, so callers that draw several
    curves for one batch compute them once. `images`, when given, says which image each row is
    (rows of one image share its fill, e.g. several methods' maps of a batch stacked): where two
    rows of one image have removed the same pixels at a step, one forward pass serves both (coarse
    or tied maps often agree on whole fractions).
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    x = x.detach()
    n, _, height, width = x.shape
    pixels = height * width
    target = torch.as_tensor(target, dtype=torch.long).reshape(-1).cpu()
    if isinstance(maps, Tensor):
        maps = maps.detach().cpu().numpy()
    scores = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32).reshape(n, -1))
    if scores.shape[1] != pixels:
        raise ValueError(f"maps have {scores.shape[1]} pixels, inputs {pixels}")
    if order == "attribution":
        ranking = torch.from_numpy(descending_order(scores.numpy()))
    elif order == "random":
        ranking = torch.from_numpy(np.random.default_rng(seed).permuted(np.tile(np.arange(pixels), (n, 1)), axis=1))
    else:
        raise ValueError(f"unknown order {order!r} (attribution, random)")
    ranking = ranking.to(x.device)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    removed = np.round(fractions * pixels).astype(np.int64)
    fill_t = torch.zeros_like(x) if fill is None else fill.detach().to(x).expand_as(x)
    channels = x.shape[1]
    order_index = ranking.unsqueeze(1).expand(n, channels, pixels)
    fill_ranked = fill_t.reshape(n, channels, pixels).gather(2, order_index)  # fill values in removal order
    curves = np.empty((n, steps + 1), dtype=np.float64)
    first, last = 0, steps + 1  # the steps that go through the model
    if ends is not None:
        curves[:, 0], curves[:, steps] = ends
        first, last = 1, steps
    per_call = max(1, min(last - first, batch_size // n))  # whole steps per forward call
    # Each buffer slot moves forward through the steps; only the pixels newly removed since its last
    # step are written (a slice of the ranking), never whole images.
    buffer = x.detach().unsqueeze(0).repeat(per_call, 1, 1, 1, 1).reshape(per_call, n, channels, pixels)
    done = [0] * per_call
    target_d = target.to(x.device)
    shared = None if images is None else removal_classes(ranking.cpu().numpy(), removed, np.asarray(images))
    passes = 0
    with torch.no_grad():
        for k0 in range(first, last, per_call):
            ks = range(k0, min(k0 + per_call, last))
            for j, k in enumerate(ks):
                if removed[k] > done[j]:
                    buffer[j].scatter_(2, order_index[:, :, done[j] : removed[k]], fill_ranked[:, :, done[j] : removed[k]])
                    done[j] = int(removed[k])
            if shared is None:
                batch = buffer[: len(ks)].reshape(len(ks) * n, *x.shape[1:])
            else:
                batch = torch.cat([buffer[j][torch.from_numpy(shared[k][0]).to(x.device)] for j, k in enumerate(ks)]).reshape(-1, *x.shape[1:])
            probs = torch.as_tensor(forward_probs(batch)).to(x.device)
            passes += len(batch)
            if shared is not None:  # each row reads the pass of the first row that removed the same pixels
                starts = np.cumsum([0, *(len(shared[k][0]) for k in ks)])
                probs = torch.cat([probs[int(starts[j]) :][torch.from_numpy(shared[k][1]).to(x.device)] for j, k in enumerate(ks)])
            probs = probs.reshape(len(ks), n, -1)
            picked = probs.gather(2, target_d[None, :, None].expand(len(ks), n, 1))[..., 0]
            curves[:, k0 : k0 + len(ks)] = picked.double().cpu().numpy().T
    auc = np.trapezoid(curves, fractions, axis=1)
    return DeletionResult(order=order, fractions=fractions, curves=curves, auc=auc, mean_auc=float(auc.mean()), passes=passes)
