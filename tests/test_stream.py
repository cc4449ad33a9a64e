"""Streaming quantization (issue 16): a model kept in CPU memory, each block on the device only while used.

On the CPU, ``device="cpu"`` runs the streaming code with every move a no-op; it must give the unstreamed
result bit for bit (a bare FLUX, the block-less SDXL UNet, a diffusers pipeline with its text encoders).
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
from svdquant.calibration.offload import Streamed, move
from svdquant.quantize import progress_postfix

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


def test_streaming_a_pipeline_on_the_cpu_is_bit_identical():
    """Through a diffusers FluxPipeline: its CLIP and T5 run under the streaming hooks (inputs to the device,
    outputs back, as accelerate's offload does), and --text-encoders rounds their weights on the device."""
    calib = svdquant.Calibration(prompts=["a cat", "a dog"], steps=2, snapshots=3, pipeline_kwargs=dict(tm.PIPE_KWARGS))
    plain, streamed = tm.build_flux_pipeline(), tm.build_flux_pipeline()
    svdquant.quantize(plain, RECIPE, calib, progress=False, text_encoders=True)
    svdquant.quantize(streamed, RECIPE, calib, progress=False, text_encoders=True, device="cpu")
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


# ------------------------------------------------------------------------------------------------ stopping at the first block
def count_calls(module: nn.Module) -> list[int]:
    """Completed forwards of ``module`` (one item each)."""
    calls: list[int] = []
    module.register_forward_hook(lambda m, a, o: calls.append(1))
    return calls



def test_chain_check_on_a_plain_forward():
    """ChainCheck alone: FLUX's blocks chain (double -> double -> single); a residual added between the stacks
    (ControlNet's) or a block called twice breaks it."""
    from svdquant.calibration.capture import ChainCheck

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


# ------------------------------------------------------------------------------------------------ report, bar
def test_stage_times_are_in_the_report_and_within_the_total():
    model = tm.build_flux(seed=0, dtype=DTYPE)
    calib = svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 2))
    report = svdquant.quantize(model, RECIPE, calib, progress=False, device="cpu")
    want = {"pin memory", "calibration", "calibration transfers", "transfers", "replays", "setup", "smoothing search",
            "refinement", "assemble", "build modules"}
    assert set(report.stages) == want
    assert all(v >= 0 for v in report.stages.values())
    assert sum(report.stages.values()) <= report.seconds_total
    # the per-group search is most of a run; the search stages are each group's own seconds, summed
    search = sum(report.stages[k] for k in ("setup", "smoothing search", "refinement", "assemble"))
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
    """``benchmarks/quantize_flux.py --smoke --stream``: the streaming run the GPU call makes, on the CPU."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quantize_flux.py"), "--smoke", "--stream",
                        "--snapshots", "3", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "quantize_flux.json").read_text())
    assert res["stream"] is True and res["model_ends_on"] == ["cpu"]
    assert {"calibration", "calibration transfers", "transfers", "replays", "smoothing search",
            "refinement"} <= set(res["stages"])
    assert sum(res["stages"].values()) <= res["seconds_total"]
    assert len(res["rows"]) == 10 + 2 * 3  # 1 double block, 2 single blocks


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_streaming_holds_one_block_on_the_gpu():
    """A CPU model quantized with device="cuda": at every block call (calibration and replays) only that block
    is on the GPU; the result matches quantizing on the GPU (same kernels, same inputs), and lands on the CPU."""
    model = tm.build_flux(seed=0, dtype=DTYPE, num_layers=2, num_single_layers=2)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    calls: list[list[int]] = []

    def pre(module, args, kwargs):
        calls.append([i for i, b in enumerate(blocks) if any(t.is_cuda for t in b.state_dict().values())])

    for b in blocks:
        b.register_forward_pre_hook(pre, with_kwargs=True)
    ref = copy.deepcopy(model).cuda()
    calib = svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 2))
    report = svdquant.quantize(model, RECIPE, calib, progress=False, device="cuda", max_gpu_memory="1GB")
    assert calls and all(len(c) == 1 for c in calls), calls
    assert {t.device.type for t in model.state_dict().values()} == {"cpu"}
    if hasattr(torch.cuda, "get_per_process_memory_fraction"):
        assert torch.cuda.get_per_process_memory_fraction(0) == 1.0  # the cap is lifted afterwards
    assert report.peak_memory_gb is not None and report.stages["calibration transfers"] > 0
    svdquant.quantize(ref, RECIPE, svdquant.Calibration(inputs=move(calib.inputs, "cuda")), progress=False)
    a, b = model.state_dict(), ref.state_dict()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].cpu().float(), rtol=0, atol=0, msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_streamed_pipeline_never_holds_text_encoders_and_transformer_together():
    pipe = tm.build_flux_pipeline()
    together = []

    def pre(module, args):
        encoders = any(p.is_cuda for te in (pipe.text_encoder, pipe.text_encoder_2) for p in te.parameters())
        together.append(encoders)

    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(pre)
    calib = svdquant.Calibration(prompts=["a cat", "a dog"], steps=2, snapshots=3, pipeline_kwargs=dict(tm.PIPE_KWARGS))
    svdquant.quantize(pipe, RECIPE, calib, progress=False, device="cuda", keep_on_device=True)
    assert together and not any(together)
    assert {t.device.type for t in pipe.transformer.state_dict().values()} == {"cuda"}  # keep_on_device
    assert {p.device.type for p in pipe.text_encoder_2.parameters()} == {"cpu"}
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q) is SVDQLinear
