"""Streaming quantization (issue 16): a model kept in CPU memory, each block on the device only while used.

On the CPU, ``device="cpu"`` runs the streaming code with every move a no-op; it must give the unstreamed
result bit for bit (a bare FLUX, the block-less SDXL UNet, a diffusers pipeline with its text encoders):
exact, not within a bound, because streaming changes where tensors live, never which ops run on which shapes
(the replays, the search and the forwards are the unstreamed ones, on one thread: ``one_torch_thread``).
The device moves themselves are checked for real with ``meta`` as the device, where tensors really
leave the CPU: the calibration hooks (``Streamed``) must hold one block (and the model's small rest) there
at a time and bring every tensor back. What needs a GPU (the quantization phase's moves, pinned memory, the
memory cap) is in the ``gpu`` tests at the end. Also: the stage profile of the report, the progress bar's
text, and ``benchmarks/quantize_flux.py --smoke --stream``.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
import torch.nn as nn

import svdquant
from svdquant import SVDQLinear
from svdquant.calibration import EntryRecorder
from svdquant.calibration import memory as calib_memory, replay as calib_replay, schedule as calib_schedule
from svdquant.calibration.offload import Streamed, move
from svdquant.models.text_encoders import block_stack
from svdquant.quantize import blocks as quantize_blocks, progress_postfix

RECIPE = svdquant.Int4Config(iterations=3, eval_tokens=128)
DTYPE = torch.bfloat16
CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k].cpu(), sb[k].cpu()), k


def hooks_left(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]


# ------------------------------------------------------------------------------------------------ bit for bit
@pytest.mark.parametrize("arch", ["flux", "sdxl"])
def test_streaming_on_the_cpu_is_bit_identical(arch):
    build, _ = tm.ARCHS[arch]
    model = build(seed=0, dtype=DTYPE)
    calib = svdquant.Calibration(inputs=tm.calibration_inputs(arch, model, 2))
    plain, streamed = copy.deepcopy(model), copy.deepcopy(model)
    r0 = svdquant.quantize(plain, RECIPE, calib, progress=False)
    r1 = svdquant.quantize(streamed, RECIPE, calib, progress=False, device="cpu")
    assert_same_state(plain, streamed)
    assert [(r.names, r.rel_error) for r in r0.rows] == [(r.names, r.rel_error) for r in r1.rows]
    assert not hooks_left(streamed)
    x = tm.calibration_inputs(arch, model, 1, seed=0)[0]
    assert torch.equal(tm.forward(plain, x), tm.forward(streamed, x))
    # on a device there would be a step "calibration transfers"; it is there, and tiny, on the CPU too
    assert "calibration transfers" in r1.stages and "calibration transfers" not in r0.stages


@pytest.mark.parametrize("stream", [False, True])
def test_overlapped_replays_are_bit_identical(monkeypatch, stream):
    """The worker thread that replays the next block while this one is searched (on by default on a GPU) changes
    nothing: forced on, on the CPU, the quantized FLUX (two stacks, chained) equals the sequential one, row for
    row, and its report has the stage the overlap adds."""
    model = tm.build_flux(seed=0, dtype=DTYPE, num_layers=2, num_single_layers=2)
    calib = svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 2))
    kw = dict(device="cpu") if stream else {}
    seq, over = copy.deepcopy(model), copy.deepcopy(model)
    r0 = svdquant.quantize(seq, RECIPE, calib, progress=False, **kw)
    monkeypatch.setattr(calib_replay, "overlap_replays", lambda device: True)
    grad_modes = []  # the worker thread's grad mode (per thread: it must not record autograd graphs)
    handles = [b.register_forward_pre_hook(lambda m, a: grad_modes.append(torch.is_grad_enabled()))
               for b in [*over.transformer_blocks, *over.single_transformer_blocks]]
    r1 = svdquant.quantize(over, RECIPE, calib, progress=False, **kw)
    for h in handles:
        h.remove()
    assert grad_modes and not any(grad_modes)
    assert_same_state(seq, over)
    assert [(r.names, r.rel_error) for r in r0.rows] == [(r.names, r.rel_error) for r in r1.rows]
    assert "waiting for replays" in r1.stages and "waiting for replays" not in r0.stages
    assert not hooks_left(over)


def test_an_error_in_the_search_stops_the_replay_worker(monkeypatch):
    """A failing group ends quantize with its error, and no replay thread is left running."""
    import threading

    model = tm.build_flux(seed=0, dtype=DTYPE, num_layers=2, num_single_layers=1)
    calib = svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 2))
    monkeypatch.setattr(calib_replay, "overlap_replays", lambda device: True)

    def boom(*a, **k):
        raise RuntimeError("search failed")

    monkeypatch.setattr(quantize_blocks, "solve_group", boom)
    with pytest.raises(RuntimeError, match="search failed"):
        svdquant.quantize(model, RECIPE, calib, progress=False)
    assert not [t for t in threading.enumerate() if t.name.startswith("svdquant-replay")]


def test_streaming_a_pipeline_on_the_cpu_is_bit_identical(monkeypatch):
    """Through a diffusers FluxPipeline: its CLIP and T5 run under the streaming hooks (inputs to the device,
    outputs back, as accelerate's offload does) layer by layer, and --text-encoders rounds their weights on the
    device."""
    calib = svdquant.Calibration(prompts=["a cat", "a dog"], steps=2, snapshots=3, pipeline_kwargs=dict(tm.PIPE_KWARGS))
    plain, streamed = tm.build_flux_pipeline(), tm.build_flux_pipeline()
    svdquant.quantize(plain, RECIPE, calib, progress=False, text_encoders=True)
    made = []
    stream_model = quantize_blocks.stream_model
    monkeypatch.setattr(quantize_blocks, "stream_model", lambda *a, **kw: made.append(kw) or stream_model(*a, **kw))
    svdquant.quantize(streamed, RECIPE, calib, progress=False, text_encoders=True, device="cpu")
    (kw,) = made
    clip, t5 = streamed.text_encoder, streamed.text_encoder_2
    assert kw["other_blocks"] == {id(clip): list(clip.get_submodule(block_stack(clip))), id(t5): list(t5.encoder.block)}
    assert block_stack(clip).endswith("encoder.layers")
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        assert_same_state(getattr(plain, name), getattr(streamed, name))
        assert not hooks_left(getattr(streamed, name)), name
    assert torch.equal(tm.sample(plain), tm.sample(streamed))


# ------------------------------------------------------------------------------------------------ real moves
def test_streamed_blocks_visit_the_device_one_at_a_time():
    """``meta`` as the device: a unit's tensors really leave the CPU. At each block's call exactly that block
    (and the model's rest: embedders, norm_out) is on the device, every other block at home; afterwards every
    tensor is the home tensor it was, and no hook is left."""
    model = tm.build_flux(seed=0, dtype=DTYPE, num_layers=2, num_single_layers=3)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    names = [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(3)]
    home = {id(p): p.data_ptr() for p in model.parameters()}
    seen: list[tuple[str, list[str], str]] = []

    def record(name):
        def pre(module, args):
            on_device = [n for n, b in zip(names, blocks) if next(b.parameters()).device.type == "meta"]
            seen.append((name, on_device, model.x_embedder.weight.device.type))
        return pre

    # meta outputs hold no data to bring home: the test keeps their shape only (registered first, so it runs
    # before the streaming hook that moves the output home)
    model.register_forward_hook(lambda m, a, out: (torch.zeros(out[0].shape, dtype=out[0].dtype),))
    for n, b in zip(names, blocks):
        b.register_forward_pre_hook(record(n))
    x = tm.flux_inputs(model, seed=0)
    hooks_before = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}
    with Streamed(model, blocks, "meta", "cpu"):
        for _ in range(2):
            out = model(**x)[0]
            assert out.device.type == "cpu"
            assert {p.device.type for p in model.parameters()} == {"cpu"}  # back after the call
    assert [s[0] for s in seen] == names * 2
    for name, on_device, rest in seen:
        assert on_device == [name], (name, on_device)
        assert rest == "meta"
    assert {id(p): p.data_ptr() for p in model.parameters()} == home  # no copy made at home
    assert {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()} == hooks_before


def test_resident_blocks_stay_between_calls_and_make_room_for_a_text_encoder():
    """``meta`` as the device, two of five blocks resident: once loaded they (and the model's rest) stay on the
    device across the model's calls, the others come and go at each block's call, and a text encoder's call
    sends the resident ones home first; closing leaves every tensor at home and no hook."""
    model = tm.build_flux(seed=0, dtype=DTYPE, num_layers=2, num_single_layers=3)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    encoder = nn.Linear(4, 4)
    seen: list[tuple[int, list[int]]] = []

    def on_device():
        return [i for i, b in enumerate(blocks) if next(b.parameters()).device.type == "meta"]

    model.register_forward_hook(lambda m, a, out: (torch.zeros(out[0].shape, dtype=out[0].dtype),))
    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, on_device())))
    encoder.register_forward_pre_hook(lambda m, a: seen.append((-1, on_device())))
    encoder.register_forward_hook(lambda m, a, out: torch.zeros(out.shape))  # meta: no data to bring home
    x = tm.flux_inputs(model, seed=0)
    hooks_before = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}
    with Streamed(model, blocks, "meta", "cpu", others=[encoder], resident=2) as st:
        for _ in range(2):  # a prompt: its text encoding, then two denoising steps
            encoder(torch.zeros(1, 4))
            model(**x)
            assert on_device() == [0, 1] and model.x_embedder.weight.device.type == "meta"
            model(**x)
        assert len(st.resident) == 3  # the two blocks and the rest
    assert [i for i, _ in seen] == ([-1] + list(range(5)) * 2) * 2
    for i, here in seen:
        if i == -1:
            assert here == [], here  # the encoder runs alone
        else:
            assert set(here) - {0, 1} == {i} - {0, 1} and i in here, (i, here)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()} == hooks_before
    assert (len(encoder._forward_pre_hooks), len(encoder._forward_hooks)) == (1, 1)


GB = 10**9


def test_a_text_encoder_streamed_by_layer_runs_beside_the_resident_blocks():
    """``meta`` as the device, two of five blocks resident and a two-layer encoder that runs beside them: during the
    encoder's call the resident blocks (and the model's rest) stay, and only the encoder layer being called is on
    the device; afterwards every tensor is at home and no hook is left."""
    model = tm.build_flux(seed=0, dtype=DTYPE, num_layers=2, num_single_layers=3)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    encoder = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    layers = list(encoder)
    seen = []

    def on_device(mods):
        return [i for i, b in enumerate(mods) if next(b.parameters()).device.type == "meta"]

    model.register_forward_hook(lambda m, a, out: (torch.zeros(out[0].shape, dtype=out[0].dtype),))
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, on_device(blocks), on_device(layers))))
    encoder.register_forward_hook(lambda m, a, out: torch.zeros(out.shape))
    x = tm.flux_inputs(model, seed=0)
    with Streamed(model, blocks, "meta", "cpu", others=[encoder], other_blocks={id(encoder): layers}, resident=2,
                  beside=[id(encoder)]):
        for _ in range(2):
            encoder(torch.zeros(1, 4))
            model(**x)
            assert on_device(blocks) == [0, 1] and not on_device(layers)
    assert seen[:2] == [(0, [], [0]), (1, [], [1])]  # the first call: nothing resident yet
    assert seen[2:] == [(0, [0, 1], [0]), (1, [0, 1], [1])]  # then the resident blocks stay beside it
    assert {p.device.type for p in [*model.parameters(), *encoder.parameters()]} == {"cpu"}


def test_resident_blocks_are_pinned_only_once_something_sends_them_home(monkeypatch):
    """Pinning costs about a second per GB: the resident blocks and the rest, which cross once, stay pageable, and
    so does an encoder until it crosses a second time (with the calibration's pass ahead it crosses once); the
    streamed blocks are pinned up front. An encoder called before the model's first call has nothing to send home;
    one that does not run beside the resident blocks sends them home, and they are pinned then, once. (A CPU-only
    torch cannot pin: the pinning is recorded.)"""
    from svdquant.calibration import offload

    pinned = set()

    def pin(t):
        out = t.clone()
        pinned.add(out.data_ptr())
        return out

    monkeypatch.setattr(offload, "_pinned", pin)
    model = tm.build_flux(seed=0, dtype=DTYPE, num_layers=2, num_single_layers=3)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    encoder = nn.Linear(4, 4)
    encoder.register_forward_hook(lambda m, a, out: torch.zeros(out.shape))

    def is_pinned(module):
        return {p.data_ptr() in pinned for p in module.parameters()}

    model.register_forward_hook(lambda m, a, out: (torch.zeros(out[0].shape, dtype=out[0].dtype),))
    with Streamed(model, blocks, "meta", "cpu", others=[encoder], resident=2, pin=True, prefetch=False) as streamed:
        assert [is_pinned(b) for b in blocks] == [{False}, {False}, {True}, {True}, {True}]
        assert is_pinned(model.x_embedder) == {False} and is_pinned(encoder) == {False}
        encoder(torch.zeros(1, 4))  # its first crossing, before the model's first call: nothing else pinned
        assert is_pinned(encoder) == {False} and is_pinned(blocks[0]) == {False}
        model(**tm.flux_inputs(model, seed=0))
        assert "pin memory" not in streamed.clock.seconds
        encoder(torch.zeros(1, 4))  # not beside: the resident blocks go home, pinned from now on; it is pinned too
        assert [is_pinned(b) for b in blocks] == [{True}] * 5 and is_pinned(model.x_embedder) == {True}
        assert is_pinned(encoder) == {True}
        n = len(pinned)
        encoder(torch.zeros(1, 4))
        assert len(pinned) == n and "pin memory" in streamed.clock.seconds
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_prefetch_brings_the_next_streamed_block_while_this_one_runs():
    """``meta`` as the device, one of five blocks resident, prefetch forced (on a GPU it is on with pinned memory,
    the copy on a side stream): at each block's call that block and the next streamed one are on the device, with
    the resident one; after the forward only the resident block stays, and a forward stopped after a prefetch
    leaves the prefetched block for ``settle`` to send home."""
    model = tm.build_flux(seed=0, dtype=DTYPE, num_layers=2, num_single_layers=3)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    seen = []

    def on_device():
        return [i for i, b in enumerate(blocks) if next(b.parameters()).device.type == "meta"]

    model.register_forward_hook(lambda m, a, out: (torch.zeros(out[0].shape, dtype=out[0].dtype),))
    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, on_device())))
    x = tm.flux_inputs(model, seed=0)
    with Streamed(model, blocks, "meta", "cpu", resident=1, prefetch=True) as streamed:
        model(**x)
        assert on_device() == [0]
        assert seen == [(0, [0, 1]), (1, [0, 1, 2]), (2, [0, 2, 3]), (3, [0, 3, 4]), (4, [0, 4])]

        def stop(m, a):
            raise RuntimeError("stop")

        handle = blocks[2].register_forward_pre_hook(stop)  # after the streaming hook: block 3 is on its way
        with pytest.raises(RuntimeError, match="stop"):
            model(**x)
        handle.remove()
        assert on_device() == [0, 2, 3]
        streamed.settle()
        assert on_device() == [0]
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def layer_devices(module: nn.Module) -> tuple[list[str], list[str]]:
    """Pre-hooks on ``module``'s layers that note each call's weight device and each layer whose input is elsewhere
    (a GPU would raise there: "Input type (torch.cuda.FloatTensor) and weight type (torch.FloatTensor)..."; ``meta``
    computes on)."""
    seen, mismatched = [], []

    def check(m, args):
        w, x = next(m.parameters(recurse=False)), next((a for a in args if torch.is_tensor(a)), None)
        seen.append(w.device.type)
        if x is not None and x.device != w.device:
            mismatched.append(f"{type(m).__name__}: input on {x.device}, weight on {w.device}")

    for m in module.modules():
        if next(m.parameters(recurse=False), None) is not None:
            m.register_forward_pre_hook(check)
    return seen, mismatched


def test_a_streamed_vae_is_on_the_device_for_its_encode_and_decode():
    """``meta`` as the device (the GPU): once anything of a pipeline stays on the device between calls (resident
    blocks, the text encoders the pass ahead holds), diffusers makes its inputs there, and FluxKontextPipeline hands
    its input image to ``vae.encode``, not to the VAE's forward. The streamed VAE must be on the device for that
    call, and for ``decode``: every layer finds its weights where its input is (on a GPU the calibration failed
    there, the VAE's weights at home). The output stays where the input was; afterwards every tensor is at home,
    ``encode`` and ``decode`` are the class's again and no hook is left."""
    pipe = tm.build_kontext_pipeline()
    model, vae = pipe.transformer, pipe.vae
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    seen, mismatched = layer_devices(vae)
    hooks = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in vae.named_modules()}
    image = torch.zeros(1, 3, 16, 16, device="meta")  # what the pipeline makes on its execution device
    with Streamed(model, blocks, "meta", "cpu", others=[vae]):
        latents = pipe._encode_vae_image(image, generator=torch.Generator().manual_seed(0))
        assert {p.device.type for p in vae.parameters()} == {"cpu"}  # home again between calls
        n = len(seen)
        decoded = vae.decode(latents, return_dict=False)[0]
    assert not mismatched, mismatched
    assert 0 < n < len(seen) and set(seen) == {"meta"}
    assert latents.device.type == "meta" and decoded.shape == (1, 3, 16, 16) and decoded.device.type == "meta"
    assert {p.device.type for p in vae.parameters()} == {"cpu"}
    assert not {"encode", "decode", "forward"} & set(vae.__dict__)
    assert {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in vae.named_modules()} == hooks


def test_a_streamed_vae_crosses_once_for_a_forward_that_calls_its_encode_and_decode():
    """AutoencoderKL's forward calls its own ``encode`` and ``decode``: calls inside a call of the VAE move
    nothing, so the VAE crosses once, stays for both, and goes home after the forward."""
    pipe = tm.build_kontext_pipeline()
    model, vae = pipe.transformer, pipe.vae
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    seen, mismatched = layer_devices(vae)
    with Streamed(model, blocks, "meta", "cpu", others=[vae]) as streamed:
        ((_, unit),) = streamed.others
        onloads, onload = [], unit.onload
        unit.onload = lambda *a: onloads.append(1) or onload(*a)
        out = vae(torch.zeros(1, 3, 16, 16, device="meta")).sample
        assert {p.device.type for p in vae.parameters()} == {"cpu"}
    assert onloads == [1] and not mismatched and set(seen) == {"meta"}
    assert out.shape == (1, 3, 16, 16) and out.device.type == "meta"


def test_move_takes_an_object_holding_tensors_along_in_a_copy():
    """A VAE's ``encode`` returns its latents in a ``DiagonalGaussianDistribution`` (not a tensor, dict or list):
    brought back from the device with the output, in a copy, the original untouched; nothing to move, no copy."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput

    out = AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(torch.randn(1, 8, 2, 2)))
    dist = out.latent_dist
    assert move(out, "meta") is out and out.latent_dist is not dist
    assert out.latent_dist.mode().device.type == "meta" and out.latent_dist.std.device.type == "meta"
    assert dist.mean.device.type == "cpu" and dist.parameters.device.type == "cpu"
    assert move(out, "meta").latent_dist is out.latent_dist
    assert move(nn.Linear(2, 2), "meta").weight.device.type == "cpu"  # a module is no object to move


@pytest.mark.parametrize("model_bytes, blocks, beside", [
    (26 * 10**7 + 24 * 39 * 10**7, [39 * 10**7] * 24, True),  # T5-XXL: 0.26 GB of embeddings, 24 blocks of 0.39 GB
    (3 * GB, [GB], True),                       # 2 GB of rest + a 1 GB block and the next, prefetched: exactly 4 GB
    (3 * GB + 1, [GB], False),
    (int(3.53 * GB) + 28 * 47 * 10**7, [47 * 10**7] * 28, False),  # Qwen2.5-VL-7B: 3.53 GB of rest, 0.47 GB layers
    (GB, [], False),                                            # no blocks known: it streams whole
])
def test_which_encoders_run_beside_the_resident_blocks(model_bytes, blocks, beside):
    assert calib_memory.runs_beside(model_bytes, blocks) is beside


@pytest.mark.parametrize("sizes, rest, room, want", [
    ([10, 10, 10], 5, 4 * GB + 5 + 40 + 30, 3),  # the 4 GB margin, the rest, 4 x the largest block, all three
    ([10, 10, 10], 5, 4 * GB + 5 + 40 + 29, 2),  # one byte short of the third
    ([10, 20, 10], 5, 4 * GB + 5 + 80 + 15, 1),  # the first ones only, in order: the second does not fit
    ([10, 10, 10], 5, 4 * GB + 44, 0),           # not even one
    ([], 5, 10**12, 0),
    # FLUX.1-dev under a 24 GB cap: 19 double blocks of 0.68 GB, 38 single of 0.28 GB, 0.13 GB of rest
    ([68 * 10**7] * 19 + [28 * 10**7] * 38, 13 * 10**7, 24 * GB, 19 + 15),
])
def test_resident_blocks_counts_what_fits_after_the_margin(sizes, rest, room, want):
    assert calib_memory.resident_blocks(sizes, rest, room) == want


# ------------------------------------------------------------------------------------------------ calibrating on inputs


def force_chained(monkeypatch, chained: bool) -> None:
    """Make the quantizer take (True) or skip (False) the calibration that stops at the first block, whatever its
    check of the model found."""
    record_first = calib_schedule.record_first

    def forced(model, adapter, kw, store, on_stop):
        if chained:
            return record_first(model, adapter, kw, store, on_stop)[0], True
        entries = EntryRecorder(model, adapter.stacks, None, store)  # the full forward, as the fallback runs it
        try:
            model(**kw)
        finally:
            entries.close()
        return entries.entries, False

    monkeypatch.setattr(calib_schedule, "record_first", forced)
    if chained:  # ControlNet residuals in the inputs too
        monkeypatch.setattr(calib_schedule, "adds_between_blocks", lambda kw: False)


def count_calls(module: nn.Module) -> list[int]:
    """Completed forwards of ``module`` (one item each)."""
    calls: list[int] = []
    module.register_forward_hook(lambda m, a, o: calls.append(1))
    return calls


def quantize_counting(model, calib, **kw):
    """``svdquant.quantize`` on ``model``, with the model's completed forwards counted (the hook then removed)."""
    calls = count_calls(model)
    report = svdquant.quantize(model, RECIPE, calib, progress=False, **kw)
    model._forward_hooks.clear()
    return report, len(calls)


def test_inputs_calibration_stops_at_the_first_block_and_is_bit_identical(monkeypatch):
    """Calibrating on forward inputs, one forward as far as the first single block (the check that FLUX chains its
    two stacks) and the other forwards stop at the first double block; the single blocks' inputs come from the
    replays. The result is bit
    for bit that of recording both stacks from the forwards (the fallback, forced: the forwards after the first
    then stop at the first single block), with the snapshots held on the device and with them moved per block
    (spilled) alike."""
    model = tm.build_flux(seed=0, dtype=DTYPE, num_layers=2, num_single_layers=1)
    calib = svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 3))
    fast, whole, spilled = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    r_fast, n_fast = quantize_counting(fast, calib, device="cpu")
    with monkeypatch.context() as mp:
        force_chained(mp, False)
        mp.setattr(calib_memory, "hold_snapshots", lambda *a: False)  # both stacks recorded, snapshots moved
        r_whole, n_whole = quantize_counting(whole, calib, device="cpu")
    with monkeypatch.context() as mp:
        mp.setattr(calib_memory, "hold_snapshots", lambda *a: False)
        r_spilled, n_spilled = quantize_counting(spilled, calib, device="cpu")
    # the report says where the snapshots waited (streamed only)
    assert r_fast.snapshots_on_device is True and r_spilled.snapshots_on_device is False
    assert "3 snapshots (held on the device)" in str(r_fast) and "(crossing for every block)" in str(r_spilled)
    # no forward runs whole: the first stops at the single stack's first block once the check has read it (the
    # fallback, forced, runs the first whole)
    assert (n_fast, n_whole, n_spilled) == (0, 1, 0)
    assert_same_state(whole, fast)
    assert_same_state(whole, spilled)
    rows = [(r.names, r.rel_error) for r in r_whole.rows]
    assert [(r.names, r.rel_error) for r in r_fast.rows] == rows == [(r.names, r.rel_error) for r in r_spilled.rows]
    assert r_fast.snapshots == r_whole.snapshots == 3
    assert not hooks_left(fast) and not hooks_left(spilled)


def test_one_stack_model_never_runs_a_whole_forward(monkeypatch):
    """SD3 has one stack: no stack to derive, so not even the first input runs past the first block (forcing the
    check on the first input, only that one runs whole)."""
    model = tm.build_sd3(seed=0, dtype=DTYPE)
    calib = svdquant.Calibration(inputs=tm.calibration_inputs("sd3", model, 2))
    fast, whole = copy.deepcopy(model), copy.deepcopy(model)
    _, n_fast = quantize_counting(fast, calib)
    with monkeypatch.context() as mp:
        force_chained(mp, False)
        _, n_whole = quantize_counting(whole, calib)
    assert (n_fast, n_whole) == (0, 1)
    assert_same_state(whole, fast)
    assert not hooks_left(fast)


def test_a_model_that_does_not_chain_its_stacks_falls_back_to_whole_forwards(monkeypatch):
    """FLUX with ControlNet residuals in its inputs adds them to the last double block's outputs before the single
    blocks: the check fails on the first input, the other inputs run up to the first single block, whose
    arguments are kept, and the single blocks replay on exactly the inputs the real forward gives them. Forcing
    the shortcut instead would replay them on other inputs."""
    model = tm.build_flux(seed=0, dtype=DTYPE)
    inputs = tm.calibration_inputs("flux", model, 2)
    g = torch.Generator().manual_seed(7)
    for kw in inputs:
        kw["controlnet_block_samples"] = [torch.randn(1, 16, tm.HIDDEN, generator=g).to(DTYPE)]
    calib = svdquant.Calibration(inputs=inputs)
    single = "single_transformer_blocks.0"

    def entries_of_single(m: nn.Module, run) -> list[torch.Tensor]:
        seen = []
        handle = m.get_submodule(single).register_forward_pre_hook(
            lambda mod, a, kw: seen.append(kw["hidden_states"].clone()), with_kwargs=True)
        run()
        handle.remove()
        return seen

    truth = entries_of_single(model, lambda: [model(**kw) for kw in inputs])  # the 16-bit model, whole forwards
    fell_back, forced = copy.deepcopy(model), copy.deepcopy(model)
    seen = entries_of_single(fell_back, lambda: quantize_counting(fell_back, calib, device="cpu"))
    # the first input's whole forward, then the two replays (the second input's forward ended before this hook)
    assert len(seen) == 1 + 2
    assert all(torch.equal(a, b) for a, b in zip(seen[1:], truth))
    with monkeypatch.context() as mp:
        force_chained(mp, True)
        seen_forced = entries_of_single(forced, lambda: quantize_counting(forced, calib, device="cpu"))
    assert len(seen_forced) == 1 + 2  # the one whole forward, then the replays on derived inputs
    assert not any(torch.equal(a, b) for a, b in zip(seen_forced[1:], truth))
    # (the fast path is the default; the fallback is what ran: the results differ from the forced shortcut's)
    assert not all(torch.equal(a, b) for a, b in zip(fell_back.state_dict().values(), forced.state_dict().values()))


def test_chain_check_on_a_plain_forward():
    """ChainCheck alone: FLUX's blocks chain (double -> double -> single); a residual added between the stacks
    (ControlNet's) or a block called twice breaks it."""
    from svdquant.calibration.chain import ChainCheck

    model = tm.build_flux(seed=0, dtype=DTYPE, num_layers=2, num_single_layers=1)
    chain = [*model.transformer_blocks, model.single_transformer_blocks[0]]
    outputs = ("encoder_hidden_states", "hidden_states")
    x = tm.flux_inputs(model, seed=0)
    with torch.no_grad():
        check = ChainCheck(chain, outputs)
        model(**x)
        check.close()
        assert check.ok
        check = ChainCheck(chain, outputs)
        model(**x, controlnet_block_samples=[torch.ones(1, 16, tm.HIDDEN, dtype=DTYPE)])
        check.close()
        assert not check.ok
        check = ChainCheck(chain, outputs)
        model(**x)
        model(**x)  # the second forward calls every block again
        check.close()
        assert not check.ok
        check = ChainCheck(chain, outputs)  # no forward
        check.close()
        assert not check.ok
    assert not hooks_left(model)


def test_stopped_forwards_keep_one_entry_each_and_share_what_repeats():
    """The recorder that stops each forward at the first block, on a real FLUX: one entry per input, the forward
    never completes, and the rotary embedding (the same for every input at one resolution) is held once
    while the per-input tensors are not shared."""
    from svdquant.calibration.capture import EntryRecorder, run_inputs

    model = tm.build_flux(seed=0, dtype=DTYPE)
    completed = count_calls(model)
    singles = count_calls(model.single_transformer_blocks[0])
    inputs = tm.calibration_inputs("flux", model, 3)
    stops = []
    rec = EntryRecorder(model, ("transformer_blocks",), None, "cpu", stop=True,
                        share_except=("encoder_hidden_states", "hidden_states"))
    with torch.no_grad():
        run_inputs(model, inputs, on_stop=lambda: stops.append(1), progress=False)
    rec.close()
    entries = rec.entries["transformer_blocks"]
    assert len(entries) == 3 and len(stops) == 3 and not completed and not singles
    assert all(e["image_rotary_emb"] is entries[0]["image_rotary_emb"] for e in entries)
    for key in ("hidden_states", "encoder_hidden_states", "temb"):
        assert entries[1][key] is not entries[0][key] and not torch.equal(entries[1][key], entries[0][key])
    model._forward_hooks.clear()
    model.single_transformer_blocks[0]._forward_hooks.clear()
    assert not hooks_left(model)


def test_forwards_on_inputs_keep_the_rest_on_the_device():
    """Calibrating on forward inputs (each call stops at the first block), the model's rest (embedders) crosses
    once and stays until the hooks close, when every tensor is its home tensor again; through a pipeline (or with
    a rest bigger than a block) it goes home after each call as before."""
    from svdquant._timing import StageClock
    from svdquant.calibration.capture import EntryRecorder, run_inputs
    from svdquant.calibration.memory import stream_model

    model = tm.build_flux(seed=0, dtype=DTYPE, num_layers=2, num_single_layers=1)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    home = {id(p): p.data_ptr() for p in model.parameters()}
    kw = dict(others=[], clock=StageClock(), cap=None)
    streamed = stream_model(model, blocks, torch.device("meta"), torch.device("cpu"), through_pipeline=False, **kw)
    with streamed:
        assert streamed.keep_rest
        onloads, onload = [], streamed.rest.onload
        streamed.rest.onload = lambda *a: onloads.append(1) or onload(*a)
        rec = EntryRecorder(model, ("transformer_blocks",), None, "meta", stop=True)
        run_inputs(model, tm.calibration_inputs("flux", model, 3), on_stop=streamed.settle, progress=False)
        rec.close()
        assert onloads == [1] and streamed.rest.loaded
        assert not any(streamed.unit(b).loaded for b in blocks)
    assert {id(p): p.data_ptr() for p in model.parameters()} == home
    with stream_model(model, blocks, torch.device("meta"), torch.device("cpu"), through_pipeline=True,
                      **kw) as piped:
        assert not piped.keep_rest


def test_stopped_forwards_leave_nothing_on_the_device():
    """``meta`` as the device: the forwards that stop at the first block leave the model's rest (embedders) on the
    device until ``Streamed.offload`` puts it back; the first block is never even onloaded (the stopping hook runs
    before the streaming one), and afterwards every tensor is its home tensor and no hook is left."""
    from svdquant.calibration.capture import EntryRecorder, run_inputs

    model = tm.build_flux(seed=0, dtype=DTYPE, num_layers=2, num_single_layers=1)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    home = {id(p): p.data_ptr() for p in model.parameters()}
    hooks_before = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}
    after_stop = []
    with Streamed(model, blocks, "meta", "cpu") as streamed:
        onloads = []
        first = streamed.unit(blocks[0])
        first.onload = lambda: onloads.append(1)

        def on_stop():
            after_stop.append(streamed.rest.loaded)  # the rest is still on the device here
            streamed.offload()
            after_stop.append(streamed.rest.loaded or {p.device.type for p in model.parameters()} != {"cpu"})

        rec = EntryRecorder(model, ("transformer_blocks",), None, "meta", stop=True)
        run_inputs(model, tm.calibration_inputs("flux", model, 2), on_stop=on_stop, progress=False)
        rec.close()
    assert after_stop == [True, False] * 2
    assert not onloads
    assert len(rec.entries["transformer_blocks"]) == 2
    assert rec.entries["transformer_blocks"][0]["hidden_states"].device.type == "meta"
    assert {id(p): p.data_ptr() for p in model.parameters()} == home
    assert {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()} == hooks_before


# ------------------------------------------------------------------------------------------------ snapshots on device
@pytest.mark.parametrize("snapshots,block,room,search,fits", [
    # FLUX.1-dev at 1024², 128 snapshots: 33 MB each, held twice; a 0.68 GB double block
    (2 * 128 * 33 * 10**6, 68 * 10**7, 24 * 10**9, 0, True),   # 8.45 + 2.72 + 4 = 15.2 GB in a 24 GB cap
    (2 * 128 * 33 * 10**6, 68 * 10**7, 16 * 10**9, 0, True),
    (2 * 128 * 33 * 10**6, 68 * 10**7, 15 * 10**9, 0, False),
    (2 * 512 * 33 * 10**6, 68 * 10**7, 24 * 10**9, 0, False),  # 512 snapshots: 33.8 GB
    # with GPTQ, three groups at once (8.15 GB: test_search_bytes_of_flux): 19.3 GB, held at 24 GB, not at 16
    (2 * 128 * 33 * 10**6, 68 * 10**7, 24 * 10**9, 8_153_726_976, True),
    (2 * 128 * 33 * 10**6, 68 * 10**7, 16 * 10**9, 8_153_726_976, False),
    (10**9, 10**9, 9 * 10**9, 0, True),                         # exactly full: fits
    (10**9, 10**9, 9 * 10**9 - 1, 0, False),
    (10**9, 10**9, 9 * 10**9, 4 * 10**9, True),                 # a search under the 4 GB margin: the margin
    (10**9, 10**9, 9 * 10**9, 4 * 10**9 + 1, False),
    (0, 0, 4 * 10**9 - 1, 0, False),                            # the search's 4 GB alone
])
def test_snapshots_fit(snapshots, block, room, search, fits):
    assert calib_memory.snapshots_fit(snapshots, block, room, search) is fits


def test_search_bytes_of_flux():
    """What FLUX.1-dev's groups hold at once (the most over its blocks): with GPTQ and three workers, a double
    block's two fc2 (3,072 × 12,288: 3.32 GB each) and its adaLN linear (18,432 × 3,072, weight-only: 1.51 GB);
    with one, the single block's out projection (3,072 × 15,360) alone; without GPTQ, much less."""
    from diffusers import FluxTransformer2DModel

    from svdquant.algorithm.layer import peak_bytes
    from svdquant.quantize.blocks import _search_bytes

    int4 = svdquant.get_recipe("int4")
    assert peak_bytes(3072, 15360, int4) == 4 * (6 * 3072 * 15360 + 4 * 15360**2) == 4_907_335_680
    assert peak_bytes(3072, 15360, svdquant.get_recipe("int4", gptq=False)) == 4 * 3 * 3072 * 15360
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    adapter = svdquant.models.get_adapter(model)
    planned = [(n, b, adapter.groups(b)) for n, b in adapter.blocks(model)]
    assert _search_bytes(planned, int4, 1) == 4_907_335_680
    assert _search_bytes(planned, int4, 3) == 8_153_726_976
    assert _search_bytes(planned, svdquant.get_recipe("int4", gptq=False), 3) < 2 * 10**9


def test_the_snapshot_policy_is_told_what_the_groups_hold(monkeypatch):
    """A streamed quantization asks :func:`hold_snapshots` with the most a block's groups hold at once (the
    recipe's GPTQ and the workers counted): the snapshots wait at home when that and they do not fit together."""
    from svdquant.quantize.blocks import _search_bytes

    asked = []
    monkeypatch.setattr(calib_memory, "hold_snapshots", lambda *a: asked.append(a) or False)
    model = tm.build_flux(seed=0, dtype=DTYPE, num_layers=1, num_single_layers=1)
    adapter = svdquant.models.get_adapter(model)
    planned = [(n, b, adapter.groups(b)) for n, b in adapter.blocks(model)]
    want, one = _search_bytes(planned, RECIPE, 2), _search_bytes(planned, RECIPE, 1)
    svdquant.quantize(model, RECIPE, svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 2)),
                      progress=False, device="cpu", workers=2)
    assert len(asked) == 1 and asked[0][-1] == want > one > 0


def test_the_snapshot_policy_is_asked_with_the_resident_blocks_gone_home(monkeypatch):
    """Through a pipeline the first blocks stay on the device between denoising steps (resident); the quantize phase
    streams every block and needs none of them, so whether the snapshots fit is asked once they have gone home
    (FLUX.1-dev at a 24 GB cap: 17 resident GB that would leave the snapshots too little room)."""
    made, loaded = [], []

    def resident_two(model, blocks, device, home, **kw):
        made.append(Streamed(model, blocks, device, home, others=kw["others"], other_blocks=kw["other_blocks"],
                             clock=kw["clock"], resident=2))
        return made[-1]

    def ask(*a):
        loaded.append([u.loaded for u in made[0]._units()])
        return True

    monkeypatch.setattr(quantize_blocks, "stream_model", resident_two)
    monkeypatch.setattr(calib_memory, "hold_snapshots", ask)
    seen = []
    pipe = tm.build_flux_pipeline()
    pipe.transformer.single_transformer_blocks[0].register_forward_pre_hook(
        lambda m, a: seen.append(made[0].blocks[id(m)].loaded))
    calib = svdquant.Calibration(prompts=["a cat"], steps=2, snapshots=2, pipeline_kwargs=dict(tm.PIPE_KWARGS))
    svdquant.quantize(pipe, RECIPE, calib, progress=False, device="cpu")
    assert True in seen  # a later step found the block still there: it was resident
    assert len(loaded) == 1 and not any(loaded[0]), loaded


def test_snapshots_stay_on_the_cpu_device():
    """Where the snapshots wait: not streaming, or streaming on the CPU, they never move; a device whose free
    memory torch cannot tell (not CUDA) gets them per block."""
    assert calib_memory.hold_snapshots(torch.device("cpu"), None, False, 10**15, 10**12)
    assert calib_memory.hold_snapshots(torch.device("cpu"), None, True, 10**15, 10**12)
    assert not calib_memory.hold_snapshots(torch.device("mps"), None, True, 1, 1)


# ------------------------------------------------------------------------------------------------ report, bar
def test_stage_times_are_in_the_report_and_within_the_total():
    model = tm.build_flux(seed=0, dtype=DTYPE)
    calib = svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 2))
    report = svdquant.quantize(model, RECIPE, calib, progress=False, device="cpu")
    # no "pin memory": the model is pinned only for a pipeline's calibration on a GPU
    want = {"calibration", "calibration transfers", "transfers", "replays", "setup", "smoothing search",
            "refinement", "gptq", "assemble", "build modules"}
    assert set(report.stages) == want
    assert all(v >= 0 for v in report.stages.values())
    assert sum(report.stages.values()) <= report.seconds_total
    # the per-group search is most of a run; the search stages are each group's own seconds, summed
    search = sum(report.stages[k] for k in ("setup", "smoothing search", "refinement", "gptq", "assemble"))
    assert search <= sum(r.seconds for r in report.rows) <= search + report.stages["build modules"]
    text = str(report)
    for stage in want:
        assert f"\n{stage:22s} " in text, stage
    assert "other (hooks, Python)" in text
    # the stages are kept in the checkpoint's copy of the report
    assert json.loads(json.dumps(report.to_dict()))["stages"] == report.stages


@pytest.mark.parametrize("args,text", [
    (("transformer_blocks.3", 4, 57), "block 4/57 transformer_blocks.3, 53 left"),
    (("single_transformer_blocks.37", 57, 57, "proj_out"), "block 57/57 single_transformer_blocks.37, 0 left, proj_out"),
    (("transformer_blocks.0", 1, 57, "attn.to_q+to_k+to_v", int(5.24e9)),
     "block 1/57 transformer_blocks.0, 56 left, attn.to_q+to_k+to_v, GPU 5.2 GB"),
    (("transformer_blocks.0", 1, 57, None, int(5.24e9), 24 * 10**9),
     "block 1/57 transformer_blocks.0, 56 left, GPU 5.2/24.0 GB"),
])
def test_progress_postfix(args, text):
    assert progress_postfix(*args) == text


# ------------------------------------------------------------------------------------------------ benchmark
def test_quantize_flux_benchmark_smoke_streams(tmp_path):
    """``benchmarks/quantize_flux.py --smoke --stream --profile``: the streaming run the GPU call makes, on the CPU,
    under torch.profiler (no kernels on a CPU: the host's op calls and their table)."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quantize_flux.py"), "--smoke", "--stream",
                        "--snapshots", "3", "--profile", "--switch-interval", "0.5", "--out", str(tmp_path)],
                       capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "quantize_flux.json").read_text())
    assert res["profile"]["gpu_ms_by_class"] == {} and res["profile"]["host_op_calls"] > 1000
    # every stage a profiler range: the groups' (svdquant/algorithm/layer.py) and the run's (svdquant/_timing.py)
    stages = res["profile"]["host_ms_by_stage"]
    assert {"setup", "smoothing search", "refinement", "gptq", "assemble", "replays"} <= set(stages), stages
    assert all(v > 0 for v in stages.values())
    assert all(v == 0 for v in res["profile"]["gpu_ms_by_stage"].values())  # no kernels on a CPU
    assert "aten::mm" in (tmp_path / "quantize_profile.txt").read_text()
    assert res["peak_gb"] != res["peak_gb"]  # NaN on the CPU: a field of its own, not lost in a comment
    assert res["stream"] is True and res["model_ends_on"] == ["cpu"]
    assert {"calibration", "calibration transfers", "transfers", "replays", "smoothing search",
            "refinement"} <= set(res["stages"])
    assert sum(res["stages"].values()) <= res["seconds_total"]
    assert len(res["rows"]) == 10 + 2 * 3  # 1 double block, 2 single blocks
    assert res["switch_interval_ms"] == pytest.approx(0.5)


def test_quantize_flux_benchmark_refuses_a_switch_interval_that_is_not_positive():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quantize_flux.py"), "--smoke",
                        "--switch-interval", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--switch-interval 0.0: use a positive number of milliseconds" in r.stderr


def test_quantize_pipeline_benchmark_smoke(tmp_path):
    """``benchmarks/quantize_pipeline.py --smoke``: a tiny FLUX pipeline calibrated through its prompts and
    quantized, streamed on the CPU; the report the GPU call writes. Both prompts are drawn at both steps, so in
    batches of two the calibration runs one whole transformer forward instead of four: step 0's (the chain check,
    and the trajectory), while step 1's, the call's last drawn, ends at the first block."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quantize_pipeline.py"), "--smoke", "--prompts",
                        "2", "--steps", "2", "--snapshots", "4", "--calibration-batch", "2", "--prefetch", "off",
                        "--beside", "off", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "quantize_pipeline.json").read_text())
    assert res["snapshots"] == 4 and res["groups"] > 0 and res["resident_blocks"] == 0  # nothing resides on a CPU
    assert res["calibration_batch"] == 2 and res["calibration_forwards"] == 1
    assert res["calibration_forwards_ended_early"] == 1
    assert (res["prompts"], res["steps"]) == (2, 2) and (res["prefetch"], res["beside"]) == ("off", "off")
    assert {"calibration", "calibration transfers", "replays", "smoothing search"} <= set(res["stages"])


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("cap,on_device", [("1GB", False), (None, True)])
def test_gpu_streaming_holds_one_block_on_the_gpu(monkeypatch, cap, on_device):
    """A CPU model quantized with device="cuda": at every block call (calibration and replays) that block is on
    the GPU with at most one other (the previous block, searched while this one replays); the result matches quantizing on the GPU (same kernels, same inputs), and lands on the CPU.
    Under a 1 GB cap the snapshots cross for every block (the 4 GB margin alone is more); with the whole GPU
    they stay there. The model is not pinned (calibration on inputs)."""
    held = []
    hold = calib_memory.hold_snapshots
    monkeypatch.setattr(calib_memory, "hold_snapshots", lambda *a: held.append(hold(*a)) or held[-1])
    model = tm.build_flux(seed=0, dtype=DTYPE, num_layers=2, num_single_layers=2)
    ref = copy.deepcopy(model).cuda()  # before the hooks: a copy would carry them into the reference run
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    calls: list[list[int]] = []

    def pre(module, args, kwargs):
        here = next(i for i, b in enumerate(blocks) if b is module)
        calls.append((here, [i for i, b in enumerate(blocks) if any(t.is_cuda for t in b.state_dict().values())]))

    for b in blocks:
        b.register_forward_pre_hook(pre, with_kwargs=True)
    calib = svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 2))
    report = svdquant.quantize(model, RECIPE, calib, progress=False, device="cuda", max_gpu_memory=cap)
    assert held == [on_device] and report.snapshots_on_device is on_device
    assert "pin memory" not in report.stages and not any(p.is_pinned() for p in model.parameters())
    assert calls and all(here in on and set(on) <= {here - 1, here} for here, on in calls), calls
    assert {t.device.type for t in model.state_dict().values()} == {"cpu"}
    if hasattr(torch.cuda, "get_per_process_memory_fraction"):
        assert torch.cuda.get_per_process_memory_fraction(0) == 1.0  # the cap is lifted afterwards
    assert report.peak_memory_gb is not None and report.stages["calibration transfers"] > 0
    monkeypatch.setattr(calib_replay, "overlap_replays", lambda device: False)  # the reference: one block at a time
    svdquant.quantize(ref, RECIPE, svdquant.Calibration(inputs=move(calib.inputs, "cuda")), progress=False)
    a, b = model.state_dict(), ref.state_dict()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].cpu().float(), rtol=0, atol=0, msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_streamed_pipeline_runs_its_t5_layer_by_layer_beside_the_resident_blocks(monkeypatch):
    """Streamed through a FLUX pipeline with the whole GPU (every block resident once loaded), without the pass
    ahead (whose calls run no transformer): no T5 layer is on the GPU while the transformer runs; T5 runs one layer
    at a time, and from the second call on beside the resident blocks (they are not sent home for it)."""
    monkeypatch.setattr(calib_schedule, "encode_ahead", lambda *a, **kw: None)
    pipe = tm.build_flux_pipeline()
    layers = list(pipe.text_encoder_2.encoder.block)
    at_block, at_layer = [], []

    def t5_on_gpu():
        return sum(any(p.is_cuda for p in layer.parameters()) for layer in layers)

    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda m, a: at_block.append(t5_on_gpu()))
    for layer in layers:
        layer.register_forward_pre_hook(lambda m, a: at_layer.append(
            (t5_on_gpu(), any(p.is_cuda for p in pipe.transformer.transformer_blocks[0].parameters()))))
    calib = svdquant.Calibration(prompts=["a cat", "a dog"], steps=2, snapshots=3, pipeline_kwargs=dict(tm.PIPE_KWARGS))
    report = svdquant.quantize(pipe, RECIPE, calib, progress=False, device="cuda", keep_on_device=True)
    assert at_block and not any(at_block)
    assert at_layer and all(n in (1, 2) for n, _ in at_layer)  # this layer, and the next one's prefetch
    assert not at_layer[0][1] and at_layer[-1][1]  # the first call: nothing resident yet; the last: beside them
    assert "pin memory" in report.stages  # many forwards through the pipeline: the weights were pinned
    assert {t.device.type for t in pipe.transformer.state_dict().values()} == {"cuda"}  # keep_on_device
    assert {p.device.type for p in pipe.text_encoder_2.parameters()} == {"cpu"}
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q) is SVDQLinear


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_the_pass_ahead_runs_t5_once_per_call_held_and_changes_nothing(monkeypatch):
    """With the pass ahead (the default), T5 runs once per pipeline call, all before the transformer's first call,
    held on the GPU from call to call; it is home afterwards, and the quantized transformer is bit for bit the one
    calibrated with T5 in every call."""
    calib = svdquant.Calibration(prompts=["a cat", "a dog"], steps=2, snapshots=3, pipeline_kwargs=dict(tm.PIPE_KWARGS))
    ahead, plain = tm.build_flux_pipeline(), tm.build_flux_pipeline()
    layer, block = ahead.text_encoder_2.encoder.block[0], ahead.transformer.transformer_blocks[0]
    seen = []
    layer.register_forward_pre_hook(lambda m, a: seen.append(("t5", next(m.parameters()).is_cuda)))
    block.register_forward_pre_hook(lambda m, a: seen.append(("block", None)))
    svdquant.quantize(ahead, RECIPE, calib, progress=False, device="cuda")
    t5 = [i for i, (what, _) in enumerate(seen) if what == "t5"]
    assert t5 and max(t5) < seen.index(("block", None))  # all in the pass, before any transformer call
    assert all(on_gpu for what, on_gpu in seen if what == "t5")
    assert {p.device.type for p in ahead.text_encoder_2.parameters()} == {"cpu"}
    monkeypatch.setattr(calib_schedule, "encode_ahead", lambda *a, **kw: None)
    svdquant.quantize(plain, RECIPE, calib, progress=False, device="cuda")
    assert_same_state(ahead.transformer, plain.transformer)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_prefetched_streaming_is_bit_identical(monkeypatch):
    """Through a pipeline (pinned weights) the next block's copy runs on a side stream during this block's
    compute; the quantized transformer is bit for bit the one streamed without prefetch."""
    calib = svdquant.Calibration(prompts=["a cat", "a dog"], steps=2, snapshots=3, pipeline_kwargs=dict(tm.PIPE_KWARGS))
    made = []
    stream_model = quantize_blocks.stream_model
    monkeypatch.setattr(quantize_blocks, "stream_model",
                        lambda *a, **kw: made.append(stream_model(*a, **kw)) or made[-1])
    with_prefetch, without = tm.build_flux_pipeline(), tm.build_flux_pipeline()
    # a 1 GB cap: nothing resident, every block streamed at every call
    svdquant.quantize(with_prefetch, RECIPE, calib, progress=False, device="cuda", max_gpu_memory="1GB")
    init = Streamed.__init__
    monkeypatch.setattr(Streamed, "__init__", lambda self, *a, **kw: init(self, *a, **{**kw, "prefetch": False}))
    svdquant.quantize(without, RECIPE, calib, progress=False, device="cuda", max_gpu_memory="1GB")
    assert made[0]._copies is not None and made[1]._copies is None
    assert_same_state(with_prefetch.transformer, without.transformer)


def test_layers_outside_the_blocks_are_quantized_streamed_too():
    """FLUX.2's modulation and embedders (the adapter's model_groups): INT8 weight-only after the blocks, the same
    streamed as not, back where they were, one report row each (the weight's own error), their stage timed."""
    model = tm.build_flux2(seed=0, dtype=DTYPE)
    calib = svdquant.Calibration(inputs=tm.calibration_inputs("flux2", model, 2))
    plain, streamed = copy.deepcopy(model), copy.deepcopy(model)
    r0 = svdquant.quantize(plain, RECIPE, calib, progress=False)
    r1 = svdquant.quantize(streamed, RECIPE, calib, progress=False, device="cpu")
    assert_same_state(plain, streamed)
    outside = [r for r in r0.rows if r.names[0] in ("double_stream_modulation_img.linear",
                                                    "double_stream_modulation_txt.linear",
                                                    "single_stream_modulation.linear", "context_embedder",
                                                    "norm_out.linear")]
    assert len(outside) == 5 and all((r.weights, r.activations) == ("int8", None) for r in outside)
    assert all(0 < r.rel_error < 0.01 for r in outside)  # per-channel INT8: the weight's own error, ~0.4 %
    assert "layers outside the blocks" in r0.stages and "layers outside the blocks" in r1.stages
    assert isinstance(plain.x_embedder, nn.Linear) and isinstance(plain.proj_out, nn.Linear)


def test_a_stage_is_timed_and_named_for_the_profiler_even_when_it_fails():
    """StageClock.stage (svdquant/_timing.py): wall seconds summed per stage on the CPU, an ``svdquant::<stage>``
    profiler range around it, and an error inside it still ends the stage and reaches the caller."""
    from torch.profiler import profile

    from svdquant._timing import StageClock

    clock = StageClock("cpu")
    with profile() as prof:
        with clock.stage("replays"):
            torch.ones(8).sum()
        with pytest.raises(ValueError, match="inside"):
            with clock.stage("transfers"):
                raise ValueError("inside")
        with clock.stage("replays"):
            pass
    names = [e.key for e in prof.key_averages() if e.key.startswith("svdquant::")]
    assert sorted(names) == ["svdquant::replays", "svdquant::transfers"]
    assert set(clock.flush()) == {"replays", "transfers"} and all(v >= 0 for v in clock.seconds.values())


def test_quantize_flux_benchmark_smoke_batched_snapshots(tmp_path):
    """``benchmarks/quantize_flux.py --smoke --batch 2``: 5 images recorded as calls of 2, 2 and 1 (a batched
    pipeline calibration's snapshots), replayed that way."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quantize_flux.py"), "--smoke", "--snapshots", "5",
                        "--batch", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "quantize_flux.json").read_text())
    assert (res["snapshots"], res["batch"], res["recorded_calls"]) == (5, 2, 3) and res["rows"]
