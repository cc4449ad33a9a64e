"""Through a pipeline, a calibration call's last drawn forward ends as soon as it has given what is recorded.

The forwards before a call's last drawn step make the denoising trajectory and run whole; the last drawn one only
has to reach the blocks whose inputs are kept. When the model chains its stacks (checked on the first forward:
FLUX's double blocks feed its single blocks), only the first stack's entries are kept and that forward ends at the
first block; otherwise it ends at the last stack's first block; a one-stack model's at its first block. The
quantized model must be bit for bit the one the whole forwards gave (the path before, forced here), with fewer
blocks run.
"""

from __future__ import annotations

from types import SimpleNamespace

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
import torch.nn as nn

import svdquant
from svdquant.calibration import draw_plan, record_inputs
from svdquant.calibration import schedule as calib_schedule
from svdquant.calibration.capture import EntryRecorder
from svdquant.calibration.draw import calibration_batches
from svdquant.calibration.offload import Streamed

RECIPE = svdquant.Int4Config(iterations=2, eval_tokens=64)
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: bit for bit needs one thread


class _WholeForwards(EntryRecorder):
    """The recorder as it was: every stack recorded, every forward run whole."""

    finish_calls = property(lambda self: False, lambda self, value: None)


def whole_forwards(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(calib_schedule, "EntryRecorder", _WholeForwards)
    mp.setattr(calib_schedule, "FirstForwardCheck", lambda *a: SimpleNamespace(close=lambda: None, chained=False))


def completed(module: nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda *a: calls.append(1))
    return calls


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]


def hooks_left(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]


FLUX_CALIB = dict(prompts=["a cat", "a dog on a hill", "a red cube", "two birds"], steps=3, snapshots=5, seed=1)


def _flux_run(perturb: bool = False, **kw):
    """Quantize a tiny FluxPipeline's transformer through its prompts; the completed forwards of the transformer,
    of its first double block and of its first single block. ``perturb``: a hook adds to what the first single
    block reads after the double blocks returned it (as ControlNet residuals are added), so the stacks do not
    chain."""
    pipe = tm.build_flux_pipeline()
    model = pipe.transformer
    if perturb:
        model.single_transformer_blocks[0].register_forward_pre_hook(
            lambda m, a, kw: (a, {**kw, "hidden_states": kw["hidden_states"] + 0.5}), with_kwargs=True)
    counts = [completed(model), completed(model.transformer_blocks[0]), completed(model.single_transformer_blocks[0])]
    calib = svdquant.Calibration(**FLUX_CALIB, pipeline_kwargs=dict(tm.PIPE_KWARGS))
    report = svdquant.quantize(pipe, RECIPE, calib, progress=False, **kw)
    for m in (model, model.transformer_blocks[0], model.single_transformer_blocks[0]):
        m._forward_hooks.clear()

    return pipe, report, [len(c) for c in counts]


def _expected_flux_calls():
    """Per pipeline call (one prompt a call on the CPU): the forwards before its last drawn step, and the drawn
    pairs; the replays then run each block once per snapshot."""
    plan = draw_plan(len(FLUX_CALIB["prompts"]), FLUX_CALIB["steps"], FLUX_CALIB["snapshots"], FLUX_CALIB["seed"])
    calls = calibration_batches(plan, 1)
    return calls, sum(max(d) for _, d in calls), sum(len(d) for _, d in calls)


@pytest.mark.parametrize("stream", [False, True])
def test_flux_calls_end_at_the_first_block_bit_for_bit(monkeypatch, stream):
    """FLUX chains its stacks: after the first forward (whole: the check), each call's last drawn forward ends at the
    first double block, only the double stack's entries are kept, and the quantized transformer is bit for bit the
    whole forwards' (streamed on the CPU too, where ``Streamed.settle`` cleans up after each stopped forward)."""
    kw = dict(device="cpu") if stream else {}
    fast, r_fast, n_fast = _flux_run(**kw)
    with monkeypatch.context() as mp:
        whole_forwards(mp)
        before, r_before, n_before = _flux_run(**kw)
    calls, trajectory, snapshots = _expected_flux_calls()
    assert r_fast.snapshots == r_before.snapshots == snapshots
    # the whole forwards ran every step up to each call's last drawn one; now that one does not run
    assert n_before[0] == trajectory + len(calls)
    first_whole = int(max(calls[0][1]) == 0)  # the first call's last drawn forward is the check's: it runs whole
    assert n_fast[0] == trajectory + first_whole
    # the first double block: the same calibration forwards (it is where the recorder ends them), then replays
    assert n_fast[1] == n_fast[0] + snapshots and n_before[1] == n_before[0] + snapshots
    assert n_fast[2] == n_fast[0] + snapshots and n_before[2] == n_before[0] + snapshots
    assert_same_state(before.transformer, fast.transformer)
    assert [(r.names, r.rel_error) for r in r_fast.rows] == [(r.names, r.rel_error) for r in r_before.rows]
    assert not hooks_left(fast.transformer)


def test_a_pipeline_whose_stacks_do_not_chain_keeps_both_and_ends_at_the_single_blocks(monkeypatch):
    """With the double blocks' outputs changed before the single blocks read them, the check fails: both stacks'
    entries are kept from the real forwards, and a call's last drawn forward ends at the first single block (after
    the double blocks, before the singles), bit for bit the whole forwards' result."""
    fast, r_fast, n_fast = _flux_run(perturb=True)
    with monkeypatch.context() as mp:
        whole_forwards(mp)
        before, r_before, n_before = _flux_run(perturb=True)
    calls, trajectory, snapshots = _expected_flux_calls()
    first_whole = int(max(calls[0][1]) == 0)
    assert n_fast[0] == trajectory + first_whole and n_before[0] == trajectory + len(calls)
    # every call's forwards ran the double blocks (the last one up to the single stack): no fewer double-block calls
    assert n_fast[1] == n_before[1] == trajectory + len(calls) + snapshots
    assert n_fast[2] == n_fast[0] + snapshots
    assert_same_state(before.transformer, fast.transformer)
    assert [(r.names, r.rel_error) for r in r_fast.rows] == [(r.names, r.rel_error) for r in r_before.rows]


def test_a_one_stack_pipeline_ends_each_call_at_its_first_block(monkeypatch):
    """Wan (one stack, classifier-free guidance as two calls per step): each call's last drawn step runs neither its
    conditional forward past the first block nor its unconditional one; bit for bit the whole forwards' result."""
    def run():
        pipe = tm.build_wan_pipeline()
        n = completed(pipe.transformer)
        calib = svdquant.Calibration(prompts=["a cat", "a boat"], steps=3, snapshots=4, seed=0,
                                     pipeline_kwargs=dict(tm.WAN_KWARGS))
        report = svdquant.quantize(pipe, RECIPE, calib, progress=False)
        pipe.transformer._forward_hooks.clear()
        return pipe, report, len(n)

    fast, r_fast, n_fast = run()
    with monkeypatch.context() as mp:
        whole_forwards(mp)
        before, r_before, n_before = run()
    calls = calibration_batches(draw_plan(2, 3, 4, 0), 1)
    assert n_before == 2 * sum(max(d) + 1 for _, d in calls) and n_fast == 2 * sum(max(d) for _, d in calls)
    assert r_fast.snapshots == r_before.snapshots == 4
    assert_same_state(before.transformer, fast.transformer)


def test_recorded_inputs_end_each_call_at_its_last_drawn_forward():
    """``record_inputs`` keeps the model's arguments at its pre-hook: the last drawn forward of a call does not run."""
    pipe = tm.build_flux_pipeline()
    began, whole = [], completed(pipe.transformer)
    pipe.transformer.register_forward_pre_hook(lambda *a: began.append(1))
    calib = svdquant.Calibration(**FLUX_CALIB, pipeline_kwargs=dict(tm.PIPE_KWARGS))
    inputs = record_inputs(pipe, pipe.transformer, calib, progress=False)
    calls, trajectory, snapshots = _expected_flux_calls()
    assert len(inputs) == snapshots and len(whole) == trajectory and len(began) == trajectory + len(calls)


def test_settle_sends_home_what_a_whole_forward_would_and_keeps_the_resident_blocks():
    """``meta`` as the device, one of three blocks resident: a forward stopped inside the second block leaves it and
    the resident one on the device; ``settle`` sends the second home and keeps the first (and the model's rest)."""
    model = tm.build_flux(seed=0, dtype=torch.bfloat16, num_layers=1, num_single_layers=2)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]

    class Stop(Exception):
        pass

    def stop(m, a, kw):
        raise Stop

    x = tm.flux_inputs(model, seed=0)
    with Streamed(model, blocks, "meta", "cpu", resident=1) as streamed:
        handle = blocks[1].register_forward_pre_hook(stop, with_kwargs=True)  # after the streaming hook: loaded
        with pytest.raises(Stop):
            model(**x)
        handle.remove()
        units = [streamed.unit(b) for b in blocks]
        assert [u.loaded for u in units] == [True, True, False] and streamed.rest.loaded
        streamed.settle()
        assert [u.loaded for u in units] == [True, False, False] and streamed.rest.loaded
        assert {p.device.type for p in blocks[1].parameters()} == {"cpu"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_controlnet_residuals_are_named_and_a_zero_scaled_controlnet_is_not_chained():
    """A ControlNet scaled to 0 at the first step (``control_guidance_start``) adds zeros between the blocks: the
    forward chains bit for bit, but later steps add real residuals, so a call that passes them is never chained."""
    from svdquant.calibration.chain import adds_between_blocks
    from svdquant.calibration.schedule import FirstForwardCheck
    from svdquant.models import get_adapter

    assert adds_between_blocks({"controlnet_block_samples": [torch.zeros(1)], "hidden_states": torch.zeros(1)})
    assert adds_between_blocks({"block_controlnet_hidden_states": (torch.zeros(1),)})
    assert not adds_between_blocks({"controlnet_block_samples": None, "controlnet_single_block_samples": None,
                                    "hidden_states": torch.zeros(1)})
    model = tm.build_flux(seed=0, dtype=torch.bfloat16, num_layers=2, num_single_layers=1)
    adapter = get_adapter(model)
    x = tm.flux_inputs(model, seed=0)
    for residuals, chained in ((None, True), ([torch.zeros(1, 16, tm.HIDDEN, dtype=torch.bfloat16)], False)):
        rec = EntryRecorder(model, adapter.stacks, None, "cpu")
        check = FirstForwardCheck(model, adapter, rec)
        assert not rec.finish_calls
        with torch.no_grad():
            model(**x, controlnet_block_samples=residuals)
        assert check.chained is chained and rec.finish_calls
        assert list(rec.entries) == list(adapter.stacks[:1] if chained else adapter.stacks)
        assert all(len(e) == 1 for e in rec.entries.values())
        check.close()
        rec.close()
        assert not hooks_left(model)


def test_settle_sends_home_the_rest_when_nothing_is_resident():
    """With no resident block the model's rest (embedders, norm_out) goes home too, as after a whole forward."""
    model = tm.build_flux(seed=0, dtype=torch.bfloat16, num_layers=1, num_single_layers=1)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]

    def stop(m, a, kw):
        raise RuntimeError("stop")

    with Streamed(model, blocks, "meta", "cpu") as streamed:
        handle = blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
        with pytest.raises(RuntimeError, match="stop"):
            model(**tm.flux_inputs(model, seed=0))
        handle.remove()
        assert streamed.rest.loaded and streamed.unit(blocks[0]).loaded
        streamed.settle()
        assert not streamed.rest.loaded and not streamed.unit(blocks[0]).loaded
        assert {p.device.type for p in model.parameters()} == {"cpu"}
