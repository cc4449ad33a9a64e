"""The quantize phase, block by block: calibrate, then per block replay it in 16 bits, quantize its groups and
swap them in place.

With stacks of blocks (every supported transformer): the calibration keeps each stack's first-block arguments
(:func:`svdquant.calibration.calibrate_stacks`), then each block replays on them while hooks keep what its
linears read (:class:`svdquant.calibration.Replayer`), its groups are quantized (:func:`quantize_group`) and its
16-bit outputs become the next block's inputs; only one block's layer inputs are held at once, and every layer
is calibrated on 16-bit inputs. Without stacks (the generic adapter, the SDXL UNet): one calibration pass records
every group's inputs, then the groups are quantized in turn.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch.nn as nn

from .._progress import progress as progress_bar
from .._timing import StageClock
from ..algorithm import quantize_linears
from ..algorithm.layer import peak_bytes
from ..calibration import (
    LinearInputRecorder, Replayer, calibrate_stacks, finish_block, gpu_memory, replay_jobs, run_calibration,
    stream_model,
)
from ..calibration.ahead import encode_ahead
from ..calibration.merge import merge_calls, merges_replays
from ..models import Group
from ..models.base import present, set_module
from ..models.text_encoders import block_stack, quantize_layer_weight_only, text_encoders
from ..modules import SVDQConv1x1, SVDQLinear
from ..modules.conv import as_linear
from ..recipes import QuantConfig
from .concurrent import GroupWorkers
from .plan import QuantPlan
from .report import LayerRow, progress_postfix, short_names


@dataclass
class Quantized:
    """What the quantize phase did to the model: one row per group, the snapshots drawn, and the seconds from
    the call's start to the end of calibration."""

    rows: list[LayerRow]
    snapshots: int
    seconds_calibration: float
    snapshots_on_device: bool | None = None  # streamed with stacks: whether they stayed on the device


def weight_only(recipe: QuantConfig, fmt: str | None = None) -> QuantConfig:
    """The recipe for a group that keeps 16-bit activations: the weight format's weight-only choice (two-level
    INT4 recipes keep 16-bit group scales there: a weight-only GEMV reads them for free), or the group's own
    ``fmt`` (:attr:`svdquant.models.Group.weight_format`) with that format's default grouping."""
    from ..formats import get_format

    if fmt is not None:  # GPTQ where the format has a grid to round to (INT8's per-row rounding has none)
        f = get_format(fmt)
        return recipe.replace(weights=fmt, activations=None, method="naive", rank=0, group_size=f.default_group,
                              gptq=recipe.gptq and f.has_weight_grid)
    if recipe.activations is None:
        return recipe
    return recipe.replace(weights=get_format(recipe.weights).weight_only, activations=None, method="naive", rank=0)


def quantize_group(root: nn.Module, group: Group, x, amax, recipe: QuantConfig, clock: StageClock | None = None,
                   prefix: str = "") -> LayerRow:
    """Quantize ``group`` (names relative to ``root``) from its inputs ``x`` and their ``amax`` and swap the new
    layers into ``root``; the row names the layers as the model does (``prefix``: ``root``'s name in it)."""
    return install_group(root, group, solve_group(root, group, x, amax, recipe), clock, prefix)


@dataclass
class Solved:
    """One group's quantizer result, before its modules are built: what :func:`install_group` swaps in."""

    recipe: QuantConfig  # the recipe the group was quantized with (weight-only groups: their own)
    weights: list  # QuantizedWeights, one per layer
    report: object  # the group's LayerReport
    seconds: float  # wall seconds of the quantizer


def solve_group(root: nn.Module, group: Group, x, amax, recipe: QuantConfig, concurrent: int = 1) -> Solved:
    """The quantizer's part of :func:`quantize_group`: reads the layers, changes nothing (a worker thread may run
    it while others quantize the block's other groups; ``concurrent`` of them share the free GPU memory)."""
    t0 = time.perf_counter()
    lins = [_linear(root.get_submodule(n)) for n in group.names]
    rc = weight_only(recipe, group.weight_format) if group.weight_only else recipe
    qws, rep = quantize_linears([lin.weight for lin in lins], [lin.bias for lin in lins], x, rc,
                                post_gelu=group.post_gelu, shared_branch=group.shared_branch, act_max=amax,
                                concurrent=concurrent)
    return Solved(rc, qws, rep, time.perf_counter() - t0)


def install_group(root: nn.Module, group: Group, solved: Solved, clock: StageClock | None = None,
                  prefix: str = "") -> LayerRow:
    """The modules built from ``solved`` swapped into ``root``; its stages go to ``clock``."""
    t0 = time.perf_counter()
    mods = [root.get_submodule(n) for n in group.names]
    rc, rep = solved.recipe, solved.report
    qmods = [SVDQLinear.from_quantized(qw, rc, m.weight.dtype, rep) for qw, m in zip(solved.weights, mods)]
    for name, old, q in zip(group.names, mods, qmods):
        set_module(root, name, SVDQConv1x1(q) if isinstance(old, nn.Conv2d) else q)
    if clock is not None:
        for stage, seconds in rep.stages.items():
            clock.add(stage, seconds)
        # packing the codes, the runner, swapping the modules in (and reading the layers before the quantizer)
        clock.add("build modules", time.perf_counter() - t0 + solved.seconds - sum(rep.stages.values()))
    return LayerRow.of_group([f"{prefix}.{n}" if prefix else n for n in group.names], rc, rep)


def _solve_recorded(rec, block: nn.Module, group: Group, recipe: QuantConfig, concurrent: int) -> Solved:
    """:func:`solve_group` on the inputs ``rec`` (a block's recorder) kept for ``group``."""
    x, amax = rec.inputs(group.names[0])
    return solve_group(block, group, x, amax, recipe, concurrent=concurrent)


def _group_cost(block: nn.Module, group: Group, recipe: QuantConfig) -> float:
    """A group's expected quantizer time, from its weights' shapes: ``N·K`` for the search and refinement (an
    eighth of it for a weight-only group, which has neither), plus ``K²/8`` with GPTQ for its inverse factor
    (quadratic in K here: the factor's cubic cost dominates only past FLUX's widths). Per group at FLUX.1-dev's
    shapes on an H200 (BENCHMARKS.md): q/k/v 9216 × 3072 ~260 ms, fc1 12288 × 3072 ~350, fc2 3072 × 12288 ~340, the
    out projection 3072 × 3072 least."""
    rows, k = _group_shape(block, group)
    cost = rows * k / (8 if group.weight_only else 1)
    return cost + (k * k / 8 if recipe.gptq else 0.0)


def _group_shape(block: nn.Module, group: Group) -> tuple[int, int]:
    """(output rows of the group's members together, their input width K), from the weights ``[N, K]`` (a 1x1
    conv's: ``[N, K, 1, 1]``)."""
    weights = [block.get_submodule(n).weight for n in group.names]
    return sum(w.shape[0] for w in weights), weights[0].shape[1]


def _search_bytes(planned, recipe: QuantConfig, workers: int) -> int:
    """What a block's groups quantized at once hold at their peak (:func:`svdquant.algorithm.layer.peak_bytes`),
    the most over the blocks: the ``workers`` largest of a block's groups (FLUX.1-dev with GPTQ, three at once:
    a double block's two fc2 and its adaLN linear, 8.15 GB)."""
    most = 0
    for _, block, groups in planned:
        sizes = [peak_bytes(*_group_shape(block, g), weight_only(recipe, g.weight_format) if g.weight_only else recipe)
                 for g in groups]
        most = max(most, sum(sorted(sizes, reverse=True)[:max(1, workers)]))
    return most


def _linear(m: nn.Module) -> nn.Module:
    return as_linear(m) if isinstance(m, nn.Conv2d) else m


def quantize_model(plan: QuantPlan, clock: StageClock) -> Quantized:
    """Calibrate ``plan.model`` and quantize it in place, block by block (or in one pass without stacks),
    streaming it to the device when the plan says so."""
    blocks = plan.adapter.blocks(plan.model) if plan.adapter.stacks else []
    streamed = None
    if plan.stream:
        encoders = {id(te) for te in text_encoders(plan.pipe).values()} if plan.pipe is not None else set()
        streamed = stream_model(plan.model, [b for _, b in blocks], plan.device, plan.home, others=plan.others,
                                other_blocks=_other_blocks(plan), clock=clock, cap=plan.cap, encoders=encoders,
                                through_pipeline=plan.calib.inputs is None)
    t_calib = time.perf_counter()
    if plan.adapter.stacks:
        done = _quantize_stacks(plan, blocks, streamed, clock, t_calib)
    else:
        done = _quantize_whole(plan, streamed, clock, t_calib)
    done.rows += _quantize_model_groups(plan, clock)
    if plan.stream and plan.keep_on_device:
        with clock.stage("transfers"):
            plan.model.to(plan.device)
    return done


def _quantize_model_groups(plan: QuantPlan, clock: StageClock) -> list[LayerRow]:
    """The adapter's layers outside the blocks (:attr:`svdquant.models.Adapter.model_groups`), weight-only in their
    group's format, rounded to nearest (no calibration inputs: none were kept for them) on the device and put back
    where the layer was. Their rows' errors are the weights' own, as a text encoder's."""
    rows = []
    t0 = time.perf_counter()
    for g in plan.adapter.model_groups:
        rc = weight_only(plan.recipe, g.weight_format).replace(gptq=False)
        for name in present(plan.model, *g.names):
            rows.append(LayerRow.of_weight(name, rc, quantize_layer_weight_only(plan.model, name, rc,
                                                                               device=plan.device)))
    if rows:
        clock.add("layers outside the blocks", time.perf_counter() - t0)
    return rows


def _other_blocks(plan: QuantPlan) -> dict[int, list[nn.Module]]:
    """The blocks of the pipeline's other models that stream block by block during this one's calibration: a
    two-expert pipeline's other denoiser (the same class as ``plan.model``), which runs its own steps, and the text
    encoders' layers (the stack their quantization knows; an encoder it does not know streams whole)."""
    found = {}
    if plan.adapter.stacks:
        found = {id(m): [b for _, b in plan.adapter.blocks(m)] for m in plan.others if type(m) is type(plan.model)}
    for te in text_encoders(plan.pipe).values() if plan.pipe is not None else ():
        if any(te is m for m in plan.others):
            try:
                found[id(te)] = list(te.get_submodule(block_stack(te)))
            except ValueError:
                pass
    return found


def _desc(step: str, plan: QuantPlan) -> str:
    """A progress bar's title: the step, and which expert of a two-expert pipeline it works on."""
    return f"{step} {plan.label}" if plan.label else step


def _calibrated(plan: QuantPlan, clock: StageClock, t_calib: float) -> float:
    """The calibration's stages on ``clock`` once it ended; returns the seconds since the call started."""
    transfers = clock.flush().pop("transfers", 0.0)
    seconds = time.perf_counter() - plan.started
    clock.add("calibration", time.perf_counter() - t_calib - transfers)
    if plan.stream:
        clock.add("calibration transfers", transfers)
    return seconds


def _quantize_stacks(plan: QuantPlan, blocks, streamed, clock: StageClock, t_calib: float) -> Quantized:
    planned = [(name, block, plan.adapter.groups(block)) for name, block in blocks]
    try:
        cal = calibrate_stacks(plan.pipe, plan.model, plan.adapter, plan.calib, blocks, streamed, device=plan.device,
                               home=plan.home, stream=plan.stream, cap=plan.cap, progress=plan.progress,
                               desc=_desc("calibrating", plan),
                               search_bytes=_search_bytes(planned, plan.recipe, plan.workers))
    finally:
        if streamed is not None:
            streamed.close()
    seconds = _calibrated(plan, clock, t_calib)
    if cal.count == 0 or not all(cal.entries.values()):
        raise RuntimeError("calibration recorded no model calls; check the calibration prompts/inputs")
    # snapshots at home cross to the device and back for every block; held on the device, they never move
    spill = plan.stream and not cal.on_device
    pin = spill and plan.device.type == "cuda"
    store = plan.home if spill else plan.device  # where a stack's last block leaves the next stack's entries
    if plan.stream and cal.on_device and plan.calib.inputs is None:
        cal.move_entries(plan.device, clock)  # recorded at home through the pipeline: one crossing for all blocks
    if merges_replays(plan.device):  # one-image recorded calls replayed a few images a call
        for entries in cal.entries.values():
            merge_calls(entries, plan.adapter.batch_inputs, pin=pin)
    bar = progress_bar(total=sum(len(g) for _, _, g in planned), desc=_desc("quantizing", plan), unit="group",
                       enabled=plan.progress)  # a bar on a terminal, a line now and then in a log
    jobs = replay_jobs(plan.adapter.stacks, planned, cal.entries, cal.chained)
    replayer = Replayer(plan.adapter, streamed, plan.device, plan.home, spill, pin, store, plan.tokens,
                        plan.calib.seed)
    try:
        rows = _replay_and_search(plan, jobs, replayer, streamed, clock, bar)
    finally:
        replayer.close()
        if streamed is not None:  # after an error: a block the worker onloaded goes back home
            streamed.offload()
    bar.close()
    return Quantized(rows, cal.count, seconds, cal.on_device if plan.stream else None)


# A block's groups queued while the previous block's last ones still run, rather than after them
# (:func:`_replay_and_search`): the workers no longer idle in a block's tail (a FLUX.1-dev single block has two heavy
# groups for three workers), and the previous block's modules are built and sent home while they work. Off: two
# blocks' groups at once ran the 57-block run out of memory at a 24 GB cap on an H100 (GPTQ's inverse, before it
# held fewer K × K matrices; NOTES-GPU.md session 26). ``quantize_flux.py --overlap-blocks on`` is the A/B.
OVERLAP_BLOCKS = False


def _replay_and_search(plan: QuantPlan, jobs, replayer: Replayer, streamed, clock: StageClock, bar) -> list[LayerRow]:
    """Each block's replay, then the search over its groups (``plan.workers`` at a time, but one at a time in a
    stack's first block: :mod:`svdquant.quantize.concurrent`); the next block replays (on a side stream) while
    this one is searched. With :data:`OVERLAP_BLOCKS`, a block's groups are queued before the previous block's
    are landed (its modules built and swapped in, the block sent home); a stack's first block still runs alone."""
    rows = []
    workers = GroupWorkers(plan.device, plan.workers)
    seen: set[str] = set()  # the stacks whose first block is done
    pending = replayer.start(jobs[0], jobs[0].recorded)
    queued = []  # (job, batch) of the blocks whose groups are queued and not landed yet, oldest first

    def land(job, batch) -> None:
        solved, wall = batch.result()
        if wall:
            clock.add("groups at once (wall)", wall)
        rows.extend(install_group(job.block, g, s, clock, prefix=job.name) for g, s in zip(job.groups, solved))
        replayer.settle()  # this block's kernels are done before the memory it read can be reused
        if streamed is not None:
            finish_block(streamed.unit(job.block), job.block, plan.home, plan.keep_on_device, clock)

    def land_all_but(newest: int) -> None:
        while len(queued) > newest:
            land(*queued[0])
            queued.pop(0)

    try:
        for index, job in enumerate(jobs, 1):
            bar.set_postfix_str(progress_postfix(job.name, index, len(jobs), None, *gpu_memory(plan.device, plan.cap)))
            rec, nxt = replayer.finish(pending, clock)
            job.recorded = None  # replayed: the search does not read the entries, and the next blocks' are coming
            if index < len(jobs):
                following = jobs[index]
                pending = replayer.start(following, following.recorded if following.recorded is not None else nxt)
            nxt = None
            stack = job.name.rsplit(".", 1)[0]
            at_once = workers.workers if stack in seen else 1  # a stack's first block: its groups one at a time
            seen.add(stack)
            if at_once == 1:  # ...and alone: it compiles the search's kernels
                land_all_but(0)
            names = [short_names(list(g.names)) if at_once == 1 else f"{at_once} groups at once" for g in job.groups]

            def done(i, job=job, index=index, names=names):
                bar.update(1)  # and the group that runs next (one at a time), or the block's label
                bar.set_postfix_str(progress_postfix(job.name, index, len(jobs), names[min(i + 1, len(names) - 1)],
                                                     *gpu_memory(plan.device, plan.cap)))

            bar.set_postfix_str(progress_postfix(job.name, index, len(jobs), names[0],
                                                 *gpu_memory(plan.device, plan.cap)))
            tasks = [functools.partial(_solve_recorded, rec, job.block, g, plan.recipe, at_once) for g in job.groups]
            costs = [_group_cost(job.block, g, plan.recipe) for g in job.groups]
            queued.append((job, workers.submit(tasks, done, concurrent=at_once > 1, costs=costs)))
            rec = tasks = None  # the batch holds the layer inputs until it is landed
            land_all_but(1 if OVERLAP_BLOCKS else 0)
        land_all_but(0)
    finally:
        for _, batch in queued:  # an error: no worker still reads a block's tensors when this unwinds
            batch.cancel()
        workers.close()
    return rows


def _quantize_whole(plan: QuantPlan, streamed, clock: StageClock, t_calib: float) -> Quantized:
    """No stacks: one calibration pass records every group's inputs; with streaming, the whole model is one unit,
    on the device while it is quantized."""
    model, calib = plan.model, plan.calib
    groups = plan.adapter.groups(model)  # not empty: make_plan refused that
    firsts = {g.names[0]: model.get_submodule(g.names[0]) for g in groups}
    holder = {}

    def hooks(selector):  # the tokens are spread over the model calls (a batched call holds several snapshots)
        calls = selector.calls if selector is not None else len(calib.inputs)
        holder["r"] = LinearInputRecorder(firsts, calls, plan.tokens, calib.seed, selector)
        return holder["r"].close

    try:
        snapshots = run_calibration(plan.pipe, model, calib, hooks, plan.progress, _desc("calibrating", plan),
                                    streaming=plan.stream and plan.device.type == "cuda",
                                    on_stop=streamed.settle if streamed is not None else None,
                                    ahead=functools.partial(encode_ahead, plan.pipe, streamed, cap=plan.cap))
    finally:
        if streamed is not None:
            streamed.close()
    seconds = _calibrated(plan, clock, t_calib)
    if streamed is not None:
        with clock.stage("transfers"):
            streamed.rest.onload()
    rows = []
    for g in progress_bar(groups, desc=_desc("quantizing", plan), unit="group", enabled=plan.progress):
        x, amax = holder["r"].inputs(g.names[0])
        rows.append(quantize_group(model, g, x, amax, plan.recipe, clock))
    if streamed is not None:
        finish_block(streamed.rest, model, plan.home, plan.keep_on_device, clock)
    return Quantized(rows, snapshots, seconds)
