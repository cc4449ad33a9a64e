"""One-image recorded calls replayed a few images a call (svdquant/calibration/merge.py)."""

from __future__ import annotations

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch

import svdquant
from svdquant import get_recipe
from svdquant.calibration import merge
from svdquant.calibration.merge import merge_calls

BATCH = ("h", "e", "t")
DEFAULT_IMAGES = merge.REPLAY_IMAGES  # before the fixture below


@pytest.fixture(autouse=True)
def four_images_a_call(monkeypatch):
    """The joined replays as ``quantize_flux.py --replay-images 4`` runs them (off by default)."""
    monkeypatch.setattr(merge, "REPLAY_IMAGES", 4)
_REPLAY = __import__("svdquant.calibration.replay", fromlist=["Replayer"]).Replayer.replay  # before any patch


def _call(i, rope, images=1, extra=None):
    g = torch.Generator().manual_seed(i)
    return dict(h=torch.randn(images, 5, 3, generator=g), e=torch.randn(images, 2, 3, generator=g),
                t=torch.randn(images, 3, generator=g), rope=rope, kw=extra)


def test_calls_join_four_images_at_a_time_in_order():
    rope = (torch.randn(7, 2), torch.randn(7, 2))
    calls = [_call(i, rope) for i in range(6)]
    entries = list(calls)
    assert merge_calls(entries, BATCH) == 2
    assert [e["h"].shape[0] for e in entries] == [4, 2]
    for k in BATCH:
        assert torch.equal(entries[0][k], torch.cat([c[k] for c in calls[:4]]))
        assert torch.equal(entries[1][k], torch.cat([c[k] for c in calls[4:]]))
    assert all(e["rope"] is rope and e["kw"] is None for e in entries)


def test_calls_stay_apart_where_they_differ():
    rope = (torch.randn(7, 2), torch.randn(7, 2))
    other = (rope[0].clone(), rope[1].clone())  # equal values, another object: the calibration would have shared it
    calls = [_call(0, rope), _call(1, rope), _call(2, other), _call(3, other, images=3), _call(4, other, extra=1),
             _call(5, other, extra=2)]
    entries = list(calls)
    assert merge_calls(entries, BATCH) == 4  # a new rope object starts a call; 1 + 3 images fit in one
    assert [e["h"].shape[0] for e in entries] == [2, 4, 1, 1]
    assert entries[2] is calls[4] and entries[3] is calls[5]  # another plain argument: apart
    wide = [_call(0, rope), dict(_call(1, rope), h=torch.randn(1, 6, 3))]  # another token count
    assert merge_calls(wide, BATCH) == 2
    assert merge_calls(calls[:2], ()) == 2  # an adapter naming no batch-major argument: never joined


def test_an_argument_two_calls_share_is_still_per_image():
    """The timestep embedding of two calls at the same step may be one object (the calibration shares bit-equal
    values): joined, it is repeated per image, not kept once."""
    rope = (torch.randn(7, 2),)
    a, b = _call(0, rope), _call(1, rope)
    b["t"] = a["t"]
    entries = [a, b]
    merge_calls(entries, BATCH)
    assert entries[0]["t"].shape == (2, 3) and torch.equal(entries[0]["t"], torch.cat([a["t"], a["t"]]))


def _quantized(monkeypatch, inputs, merged):
    """The tiny FLUX quantized from ``inputs``; each block's replayed calls (their arguments)."""
    from svdquant.calibration import replay
    from svdquant.quantize import blocks

    monkeypatch.setattr(blocks, "merges_replays", lambda device: merged)
    calls = []
    monkeypatch.setattr(replay.Replayer, "replay", lambda self, job, snaps, clock: calls.append(list(snaps)) or
                        _REPLAY(self, job, snaps, clock))
    torch.manual_seed(0)
    model = tm.build_flux()
    svdquant.quantize(model, get_recipe("int4", iterations=2, eval_tokens=64), svdquant.Calibration(inputs=inputs),
                      progress=False)
    return model, calls


def test_joined_calls_replay_as_batched_records(monkeypatch):
    """Eight one-image calls, joined for the replays: two calls per block, their arguments those of two recorded
    four-image calls (to the embedders' rounding at four images), and a quantized model as close to that one's as
    rounding allows (its decisions are discrete); replayed one image a call, another token draw, as good."""
    torch.manual_seed(0)
    ones = tm.calibration_inputs("flux", tm.build_flux(), 8)
    fours = [{k: torch.cat([c[k] for c in ones[i:i + 4]]) if k in ("hidden_states", "encoder_hidden_states",
                                                                   "pooled_projections", "timestep") else v
              for k, v in ones[i].items()} for i in (0, 4)]
    joined, calls = _quantized(monkeypatch, ones, True)
    batched, calls4 = _quantized(monkeypatch, fours, False)
    apart, calls1 = _quantized(monkeypatch, ones, False)
    assert [len(c) for c in calls] == [len(c) for c in calls4] == [2, 2] and [len(c) for c in calls1] == [8, 8]
    for got, want in zip(calls[0], calls4[0]):  # the first block's: the recorded entries
        assert got.keys() == want.keys() and got["image_rotary_emb"] is calls[0][0]["image_rotary_emb"]
        for k in ("hidden_states", "encoder_hidden_states", "temb"):
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    x = tm.flux_inputs(joined, seed=5)
    ref = tm.forward(tm.build_flux(), x)
    want, got = tm.forward(batched, x), tm.forward(joined, x)
    assert float((got - want).norm() / want.norm()) < 1e-2
    err = [float((tm.forward(m, x) - ref).norm() / ref.norm()) for m in (joined, apart)]
    assert err[0] < 2 * err[1] and err[1] < 2 * err[0], err


def test_merging_is_for_gpus_when_asked(monkeypatch):
    assert DEFAULT_IMAGES == 1  # off by default: four a call ran out of memory under a 24 GB cap
    assert merge.merges_replays(torch.device("cuda")) and not merge.merges_replays(torch.device("cpu"))
    monkeypatch.setattr(merge, "REPLAY_IMAGES", 1)
    assert not merge.merges_replays(torch.device("cuda"))
    entries = [_call(i, None) for i in range(3)]
    assert merge_calls(entries, BATCH) == 3  # the default read at the call, as the benchmark's --replay-images sets it


@pytest.mark.parametrize("n", [0, 1])
def test_nothing_to_join(n):
    entries = [_call(i, None) for i in range(n)]
    assert merge_calls(entries, BATCH) == n


def test_long_calls_join_fewer_images(monkeypatch):
    """A call of many tokens an image (an edit's, with its input image's) joins fewer: at most REPLAY_TOKENS."""
    monkeypatch.setattr(merge, "REPLAY_TOKENS", 10)
    rope = (torch.randn(7, 2),)
    entries = [_call(i, rope) for i in range(6)]  # 5 tokens an image: two a call
    assert merge_calls(entries, BATCH) == 3 and [e["h"].shape[0] for e in entries] == [2, 2, 2]
