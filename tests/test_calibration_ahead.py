"""The text encoders' pass ahead of a streamed pipeline calibration (``svdquant/calibration/ahead.py``).

Through a streamed pipeline, every calibration call first runs up to the denoiser's first call with its text
encoders held on the device, keeping what they return; the calibration calls then get those outputs without
running (or moving) the encoders. On the CPU (``device="cpu"``, every move a no-op) the quantized model must be
bit for bit the one calibrated without the pass; the device moves are checked with ``meta`` as the device.
"""

from __future__ import annotations

import copy

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
import torch.nn as nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

import svdquant
from svdquant.calibration import ahead as calib_ahead, memory as calib_memory, schedule as calib_schedule
from svdquant.calibration.ahead import EncodedAhead, call_key, rebuilt
from svdquant.calibration.offload import Streamed

RECIPE = svdquant.Int4Config(iterations=3, eval_tokens=128)
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py
GB = 10**9


def runs_of(module: nn.Module) -> list[int]:
    """A counter of ``module``'s forwards that really ran (an answered call never reaches its first layer)."""
    seen: list[int] = []
    module.register_forward_pre_hook(lambda m, a: seen.append(1))
    return seen


def quantize_streamed(pipe, calib, made: list, monkeypatch, ahead: bool = True):
    def encode_ahead(*a, **kw):
        made.append(calib_ahead.encode_ahead(*a, **kw) if ahead else None)
        return made[-1]

    monkeypatch.setattr(calib_schedule, "encode_ahead", encode_ahead)
    return svdquant.quantize(pipe, RECIPE, calib, progress=False, device="cpu")


@pytest.mark.parametrize("cfg", [False, True])
def test_calibration_calls_reuse_what_the_encoders_gave_ahead(monkeypatch, cfg):
    """A streamed tiny FLUX pipeline: each text encoder runs once per pipeline call (in the pass ahead), every
    calibration call's encoder calls are answered (with true CFG, the negative prompt's too, the same input each
    time: kept once), and the quantized transformer is bit for bit the one calibrated without the pass."""
    extra = dict(negative_prompt="", true_cfg_scale=2.0) if cfg else {}
    calib = svdquant.Calibration(prompts=["a cat", "a dog", "a red car"], steps=2, snapshots=4,
                                 pipeline_kwargs=dict(tm.PIPE_KWARGS, **extra))
    with_pass, without = tm.build_flux_pipeline(), tm.build_flux_pipeline()
    runs = [runs_of(p.text_encoder_2.encoder.block[0]) for p in (with_pass, without)]
    made: list = []
    quantize_streamed(with_pass, calib, made, monkeypatch)
    quantize_streamed(without, calib, [], monkeypatch, ahead=False)
    (encoded,) = made
    calls = len(runs[1])  # without the pass: one T5 call per prompt encoding of each pipeline call
    assert calls > 0 and len(runs[0]) == calls  # with it: the same encodings, all in the pass ahead
    assert encoded.answered == 2 * calls  # CLIP's and T5's, in the calibration calls
    assert len(encoded.outputs[id(with_pass.text_encoder_2)]) == (calls // 2 + 1 if cfg else calls)
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        a, b = getattr(with_pass, name).state_dict(), getattr(without, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    for p in (with_pass, without):
        assert "forward" not in p.text_encoder_2.__dict__  # the answering forward is gone


def test_outputs_that_would_not_fit_are_dropped_and_the_encoders_run_as_before(monkeypatch):
    """What the pass would keep for all calls, projected after its first, over ``AHEAD_BYTES``: it stops there,
    keeps nothing, and each calibration call runs its encoders."""
    monkeypatch.setattr(calib_memory, "AHEAD_BYTES", 1)
    calib = svdquant.Calibration(prompts=["a cat", "a dog"], steps=2, snapshots=3, pipeline_kwargs=dict(tm.PIPE_KWARGS))
    pipe = tm.build_flux_pipeline()
    runs = runs_of(pipe.text_encoder_2.encoder.block[0])
    made: list = []
    quantize_streamed(pipe, calib, made, monkeypatch)
    (encoded,) = made
    assert encoded.dropped and encoded.answered == 0 and not encoded.outputs
    assert len(runs) == 1 + 2  # the pass's first call, then the calibration's two


class Encoder(nn.Module):
    """A text encoder as the streaming sees one: its own weights (the rest) and a stack of layers. Streamed to
    ``meta``, its layers compute no data: the n-th run returns n everywhere."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.runs = 0

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        self.runs += 1
        return torch.full((1, 4), float(self.runs))


def streamed_with_encoder(resident: int = 0):
    model = tm.build_flux(seed=0, dtype=torch.bfloat16, num_layers=1, num_single_layers=1)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    encoder = Encoder()
    st = Streamed(model, blocks, "meta", "cpu", others=[encoder], other_blocks={id(encoder): list(encoder.layers)},
                  resident=resident)
    return model, blocks, encoder, st


def test_held_encoders_stay_through_the_pass_and_answered_calls_move_nothing():
    """``meta`` as the device, an encoder streamed by layer: held through the pass ahead, it stays on the device
    from call to call and goes home at its end; answering, a seen input returns the kept output (a new tensor) with
    nothing moved, and an unseen input runs the encoder as before."""
    model, blocks, encoder, st = streamed_with_encoder()
    loaded = []
    for layer in encoder.layers:
        layer.register_forward_pre_hook(
            lambda m, a: loaded.append([next(x.parameters()).device.type for x in encoder.layers]))
    x1, x2, x3 = torch.zeros(1, 4), torch.ones(1, 4), torch.full((1, 4), 2.0)
    with st:
        encoded = EncodedAhead(st, [encoder], [encoder], rows=2)
        with encoded.recording():
            out1, out2 = encoder(x1), encoder(x2)
            assert {p.device.type for p in encoder.parameters()} == {"meta"}  # held
        assert {p.device.type for p in encoder.parameters()} == {"cpu"}
        assert loaded == [["meta", "cpu"], ["meta", "meta"], ["meta", "meta"], ["meta", "meta"]]
        loaded.clear()
        with encoded.answering():
            again = encoder(x2)
            assert not loaded and encoded.answered == 1 and encoder.runs == 2
            assert torch.equal(again, out2) and again is not out2 and again.device.type == "cpu"
            assert torch.equal(encoder(x3), torch.full((1, 4), 3.0))  # not seen ahead: streamed and run
            assert loaded == [["meta", "cpu"], ["cpu", "meta"]]
        assert "forward" not in encoder.__dict__
    assert torch.equal(out1, torch.ones(1, 4))
    assert {p.device.type for p in encoder.parameters()} == {"cpu"}


def test_an_answered_call_leaves_the_resident_blocks_and_moves_no_encoder_weight():
    """An encoder that does not run beside the resident blocks sends them home when it runs; answered, it moves
    nothing: the resident blocks stay, none of its weights goes to the device, and nothing stays marked."""
    model, blocks, encoder, st = streamed_with_encoder(resident=2)
    onloads = []
    with st:
        encoded = EncodedAhead(st, [encoder], [], rows=1)
        with encoded.recording():
            encoder(torch.ones(1, 4))
        for u in st.resident:
            u.onload()  # as after the model's first call
        (unit,) = [u for _, u in st.others]
        unit.onload = lambda *a: onloads.append(1)
        with encoded.answering():
            encoder(torch.ones(1, 4))
            assert encoded.answered == 1 and encoder.runs == 1
            assert all(u.loaded for u in st.resident), "an answered call sent the resident blocks home"
            assert not onloads and not st._answered
            assert {p.device.type for p in encoder.parameters()} == {"cpu"}


def test_a_call_that_cannot_be_compared_or_copied_is_not_kept():
    """An argument the key cannot compare by value (an object whose repr may summarize or show an address) or an
    output holding an object it cannot copy: that call is not kept, and the calibration call runs the encoder."""
    _, _, encoder, st = streamed_with_encoder()
    with st:
        encoded = EncodedAhead(st, [encoder], [encoder], rows=2)
        with encoded.recording():
            encoder(torch.ones(1, 4))
            encoder.forward(torch.ones(1, 4, device="meta"))  # called past its hooks: no key
        assert len(encoded.outputs[id(encoder)]) == 1
        with pytest.raises(calib_ahead.Unkept):
            call_key((object(),), {})
        with pytest.raises(calib_ahead.Unkept):
            rebuilt({"a": object()}, "cpu")


@pytest.mark.parametrize("sizes, room, want", [
    ([int(0.25 * GB), int(9.5 * GB)], 24 * GB, 2),  # FLUX.1: CLIP-L and T5-XXL under a 24 GB cap
    ([int(16.6 * GB)], 24 * GB, 1),  # Qwen-Image's Qwen2.5-VL-7B
    ([48 * GB], 24 * GB, 0),  # FLUX.2 [dev]'s Mistral 3: streamed layer by layer, as before
    ([10 * GB, 10 * GB], 24 * GB, 2),  # 20 GB and the 4 GB margin: exactly full fits
    ([10 * GB, 10 * GB + 1], 24 * GB, 1),
    ([], 24 * GB, 0),
])
def test_which_encoders_stay_held_through_the_pass(sizes, room, want):
    assert calib_memory.held_ahead(sizes, room) == want


def test_call_key_is_by_value():
    a = torch.arange(6).reshape(2, 3)
    key = call_key((a,), {"output_hidden_states": False})
    assert key == call_key((a.clone(),), {"output_hidden_states": False})
    assert key != call_key((a.float(),), {"output_hidden_states": False})
    assert key != call_key((a.reshape(3, 2),), {"output_hidden_states": False})
    assert key != call_key((a + (a == 5).long(),), {"output_hidden_states": False})
    assert key != call_key((a,), {"output_hidden_states": True})
    assert key != call_key((), {"input_ids": a, "output_hidden_states": False})
    assert call_key((torch.tensor(1.0, dtype=torch.bfloat16),), {}) != call_key((torch.tensor(2.0),), {})


def test_rebuilt_outputs_share_nothing_with_the_original():
    out = BaseModelOutputWithPooling(last_hidden_state=torch.ones(1, 2, 3), pooler_output=torch.zeros(1, 3),
                                     hidden_states=(torch.ones(1), torch.zeros(1)))
    copy_ = rebuilt(out, "cpu")
    assert type(copy_) is BaseModelOutputWithPooling and list(copy_.keys()) == list(out.keys())
    assert torch.equal(copy_[0], out[0]) and copy_.pooler_output is not out.pooler_output
    assert isinstance(copy_.hidden_states, tuple) and copy_.hidden_states[0] is not out.hidden_states[0]
    plain = rebuilt({"a": [torch.ones(1)], "b": 3}, "cpu")
    assert plain["b"] == 3 and isinstance(plain["a"], list)
    assert copy.deepcopy(plain)["a"][0].item() == 1.0
