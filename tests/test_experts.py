"""Wan 2.2 A14B's two experts in one checkpoint (issue 26): ``save_quantized(pipe, ...)`` of a two-expert pipeline
writes ``transformer_2.safetensors`` beside the transformer (format version 5, ``experts`` in the metadata),
``load_pipeline`` restores both bit for bit without reading the base's own, a base with another number of experts
is refused before anything is loaded, the new entries meet the hostile-file checks, and ``quantize`` refuses a
calibration that cannot reach both experts before any work. How both are quantized: test_video.py."""

from __future__ import annotations

import json
import shutil
import types

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import svdquant
from svdquant import CheckpointError, SVDQLinear
from svdquant.checkpoint import EXPERTS_SINCE, FORMAT_VERSION, META_FILE, TENSOR_FILE, quantized_layers

RECIPE = svdquant.W4A4Config(iterations=1, eval_tokens=64)
EXPERT_FILE = "transformer_2.safetensors"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def calib(**kw):
    return svdquant.Calibration(**{**dict(prompts=["a cat", "a dog on a hill"], steps=2, snapshots=4,
                                          pipeline_kwargs=dict(tm.WAN_KWARGS)), **kw})


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """Both experts quantized and saved as one checkpoint, next to the 16-bit bases it may be loaded with (two
    experts, as it was made from, and one): a namespace of pipe, report, ck, base2, base1."""
    root = tmp_path_factory.mktemp("experts")
    base2, base1 = root / "base2", root / "base1"
    tm.build_wan_pipeline(two_experts=True).save_pretrained(base2)
    tm.build_wan_pipeline().save_pretrained(base1)
    pipe = tm.build_wan_pipeline(two_experts=True)
    report = svdquant.quantize(pipe, RECIPE, calib(), progress=False)
    ck = svdquant.save_quantized(pipe, root / "ck", base=str(base2), report=report)
    return types.SimpleNamespace(pipe=pipe, report=report, ck=ck, base2=base2, base1=base1)


def forward(model):
    with torch.no_grad():
        return model(**tm.wan_inputs(model))[0]


def copy_of(ck, tmp_path):
    shutil.copytree(ck, tmp_path / "ck")
    return tmp_path / "ck"


# ------------------------------------------------------------------------------------------------ save / load
def test_one_checkpoint_holds_both_experts(done):
    meta = svdquant.read_metadata(done.ck)
    assert sorted(p.name for p in done.ck.iterdir()) == [META_FILE, TENSOR_FILE, EXPERT_FILE]
    assert meta["format_version"] == EXPERTS_SINCE == FORMAT_VERSION == 5
    entry = meta["experts"]["transformer_2"]
    assert entry["model_class"] == "WanTransformer3DModel" and entry["recipe"]["name"] == "w4a4"
    assert entry["layers"] == quantized_layers(done.pipe.transformer_2) and len(entry["layers"]) == 20
    assert meta["layers"] == quantized_layers(done.pipe.transformer)
    assert sorted(meta["sha256"]) == [TENSOR_FILE, EXPERT_FILE]
    with safe_open(str(done.ck / EXPERT_FILE), "pt") as f:
        assert f.metadata() == {"svdquant_expert": "transformer_2"}


def test_load_pipeline_restores_both_experts_bit_exact(done):
    loaded = svdquant.load_pipeline(None, done.ck)
    for name in ("transformer", "transformer_2"):
        a, b = getattr(done.pipe, name), getattr(loaded, name)
        assert type(b.blocks[0].attn1.to_q) is SVDQLinear and quantized_layers(b) == quantized_layers(a)
        assert torch.equal(forward(a), forward(b))
    out = tm.sample_video(loaded)
    assert torch.isfinite(out).all() and torch.equal(out, tm.sample_video(done.pipe))
    # by hand, into a pipeline of one's own: the same two models
    assert torch.equal(forward(svdquant.load_quantized(done.ck)), forward(done.pipe.transformer))
    experts = svdquant.load_experts(done.ck)
    assert list(experts) == ["transformer_2"] and torch.equal(forward(experts["transformer_2"]),
                                                              forward(done.pipe.transformer_2))


def test_optimize_takes_both_experts(done):
    """svdquant.optimize on a two-expert pipeline reports on both denoisers (on the CPU each is left as it is)."""
    report = svdquant.optimize(done.pipe)
    assert list(report.experts) == ["transformer_2"]
    assert "all" in report.skipped and "all" in report.experts["transformer_2"].skipped
    assert "transformer_2: svdquant.optimize on cpu" in str(report)
    assert not svdquant.optimize(done.pipe.transformer).experts  # a bare model: itself only
    svdquant.deoptimize(done.pipe)


def test_streaming_runs_the_other_expert_one_block_at_a_time(done, monkeypatch):
    """quantize(pipe, device=...) with the pipeline at home: while one expert is calibrated, the other runs its own
    steps one block at a time on the device (each block its own unit, loaded only during its forward), so a 14B
    expert never needs its 28 GB there. On the CPU every move is a no-op but the units load and unload as on a
    GPU, and the result is the unstreamed quantization's, bit for bit."""
    from svdquant.calibration import offload

    made = []
    original = offload.Streamed.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(offload.Streamed, "__init__", spy)
    pipe = tm.build_wan_pipeline(two_experts=True)
    loaded_then = []  # per forward of a block of the expert not being calibrated: its block units on the device

    def watch(block, args):
        streamed = made[-1] if made else None
        if streamed is not None and streamed.other_block_units and id(block) not in streamed.blocks:
            loaded_then.append(sum(u.loaded for u in streamed.other_block_units))

    for expert in (pipe.transformer, pipe.transformer_2):
        for block in expert.blocks:
            block.register_forward_pre_hook(watch)
    svdquant.quantize(pipe, RECIPE, calib(), progress=False, device="cpu")
    # the other expert's blocks, and the text encoder's layers (which stream layer by layer too)
    assert len(made) == 2
    assert len(made[0].other_block_units) == len(pipe.transformer.blocks) + len(pipe.text_encoder.encoder.block)
    assert loaded_then and set(loaded_then) == {1}  # the block that runs, no other
    for name in ("transformer", "transformer_2"):
        assert torch.equal(forward(getattr(pipe, name)), forward(getattr(done.pipe, name))), name


def test_fuse_and_weight_mode_take_both_experts(done):
    pipe = done.pipe
    layers = [m for e in (pipe.transformer, pipe.transformer_2) for m in e.modules() if isinstance(m, SVDQLinear)]
    assert svdquant.set_weight_mode(pipe, "speed") == len(layers)
    before = {name: forward(getattr(pipe, name)) for name in ("transformer", "transformer_2")}
    n_blocks = len(pipe.transformer.blocks) + len(pipe.transformer_2.blocks)
    try:
        assert svdquant.fuse(pipe)["qkv"] == n_blocks  # each expert's self-attentions
        assert all(b.attn1.fused_projections for e in (pipe.transformer, pipe.transformer_2) for b in e.blocks)
        assert all(torch.equal(forward(getattr(pipe, n)), y) for n, y in before.items())
    finally:
        assert svdquant.unfuse(pipe)["qkv"] == n_blocks


def test_load_pipeline_never_reads_the_base_experts(done, tmp_path):
    """The checkpoint's experts replace the base's: those are not loaded (diffusers' DiffusionPipeline.from_pretrained
    drops Wan's transformer= and transformer_2= and loads the base's own; the pipeline's class keeps them)."""
    base = tmp_path / "base"
    shutil.copytree(done.base2, base)
    for sub in ("transformer", "transformer_2"):
        for f in (base / sub).glob("*.safetensors"):
            f.write_bytes(b"not a tensor file")
    loaded = svdquant.load_pipeline(base, done.ck)
    assert torch.equal(forward(loaded.transformer_2), forward(done.pipe.transformer_2))


def test_one_transformer_checkpoint_keeps_todays_format(done, tmp_path):
    ck = svdquant.save_quantized(done.pipe.transformer, tmp_path / "ck", base=str(done.base1))
    meta = svdquant.read_metadata(ck)
    assert sorted(p.name for p in ck.iterdir()) == [META_FILE, TENSOR_FILE]
    assert meta["format_version"] == 2 and "experts" not in meta  # older svdquant still reads it
    assert svdquant.load_experts(ck) == {}
    assert torch.equal(forward(svdquant.load_pipeline(done.base1, ck).transformer), forward(done.pipe.transformer))


# ------------------------------------------------------------------------------------------------ mismatches
def _damaged(ck, tmp_path):
    """A copy whose tensor files would fail to load: an error about the experts then came before any loading."""
    ck = copy_of(ck, tmp_path)
    for f in ck.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    return ck


def test_two_expert_checkpoint_into_a_one_expert_base(done, tmp_path):
    with pytest.raises(CheckpointError) as e:
        svdquant.load_pipeline(done.base1, _damaged(done.ck, tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "holds two experts (transformer and transformer_2" in msg
    assert "runs one; pass the two-expert base the checkpoint was made from" in msg


def test_one_transformer_checkpoint_into_a_two_expert_base(done, tmp_path):
    ck = svdquant.save_quantized(done.pipe.transformer, tmp_path / "one")
    with pytest.raises(CheckpointError) as e:
        svdquant.load_pipeline(done.base2, _damaged(ck, tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "holds one transformer, but the pipeline at" in msg
    assert "quantize and save both (svdquant.quantize(pipe, ...), svdquant.save_quantized(pipe, ...))" in msg


def test_an_expert_of_another_class_than_the_base_has(done, tmp_path):
    ck = copy_of(done.ck, tmp_path)
    _edit(ck, lambda m: m["experts"]["transformer_2"].update(model_class="FluxTransformer2DModel"))
    with pytest.raises(CheckpointError, match="quantizes a FluxTransformer2DModel as transformer_2, but the pipeline "
                                              "at .* has a WanTransformer3DModel; pass the base pipeline"):
        svdquant.load_pipeline(done.base2, ck)


def test_saving_a_pipeline_whose_second_expert_is_16bit_is_refused(done, tmp_path):
    half = types.SimpleNamespace(transformer=done.pipe.transformer, transformer_2=tm.build_wan(9))
    with pytest.raises(CheckpointError, match=r"transformer_2 has no quantized layers.*quantize\(pipe, \.\.\.\) "
                                              "quantizes both"):
        svdquant.save_quantized(half, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


# ------------------------------------------------------------------------------------------------ hostile files
def _edit(path, change):
    meta = json.loads((path / META_FILE).read_text())
    change(meta)
    (path / META_FILE).write_text(json.dumps(meta))


def _expert(change):
    return lambda p: _edit(p, lambda m: change(m["experts"]["transformer_2"]))


def _retensor(path, change):
    t = load_file(str(path / EXPERT_FILE))
    change(t)
    save_file(t, str(path / EXPERT_FILE))


HOSTILE = {
    "name-is-a-path": (lambda p: _edit(p, lambda m: m["experts"].update({"../evil": m["experts"].pop("transformer_2")})),
                       "malformed 'experts' entry (['../evil']; svdquant writes one, 'transformer_2')"),
    "not-a-dict": (lambda p: _edit(p, lambda m: m.update(experts=["transformer_2"])), "malformed 'experts' entry"),
    "empty": (lambda p: _edit(p, lambda m: m.update(experts={})), "malformed 'experts' entry"),
    "old-version": (lambda p: _edit(p, lambda m: m.update(format_version=4)),
                    "holds a second expert but says format version 4"),
    "newer-version": (lambda p: _edit(p, lambda m: m.update(format_version=99)), "Upgrade svdquant"),
    "no-layers": (_expert(lambda e: e.pop("layers")), "expert 'transformer_2' has a malformed entry (it needs"),
    "extra-key": (_expert(lambda e: e.update(tied={})), "expert 'transformer_2' has a malformed entry (it needs"),
    "class-not-a-string": (_expert(lambda e: e.update(model_class=7)), "has a malformed entry (model_class)"),
    "recipe-not-a-dict": (_expert(lambda e: e.update(recipe="w4a4")), "has a malformed entry (recipe)"),
    "huge-config": (_expert(lambda e: e["model_config"].update(ffn_dim=1 << 40)), "larger than any real model"),
    "more-blocks-than-tensors": (_expert(lambda e: e["model_config"].update(num_layers=100_000)),
                                 "model_config num_layers = 100000, but the tensor file holds only"),
    "malformed-layer": (_expert(lambda e: e["layers"]["blocks.0.attn1.to_q"].update(rank=-1)),
                        "quantized layer 'blocks.0.attn1.to_q' has a malformed entry (rank = -1)"),
    "layer-not-in-model": (_expert(lambda e: e["layers"].update(
        {"blocks.0.nope": e["layers"]["blocks.0.attn1.to_q"]})), "quantizes layer 'blocks.0.nope'"),
    "not-a-diffusers-model": (_expert(lambda e: e.update(model_class="DiffusionPipeline")),
                              "which is not a diffusers model"),
    "unknown-hash-file": (lambda p: _edit(p, lambda m: m["sha256"].update({"evil.safetensors": "0" * 64})),
                          "malformed 'sha256' entry"),
    "file-missing": (lambda p: (p / EXPERT_FILE).unlink(), "transformer_2.safetensors is missing"),
    "truncated": (lambda p: (p / EXPERT_FILE).write_bytes((p / EXPERT_FILE).read_bytes()[:-10]),
                  "truncated or corrupt"),
    "missing-tensor": (lambda p: _retensor(p, lambda t: t.pop("proj_out.weight")), "lacks 1 tensors"),
    "nan-in-scales": (lambda p: _retensor(p, lambda t: t["blocks.0.attn1.to_q.wscales"].fill_(float("nan"))),
                      "NaN / Inf values"),
    "changed-after-saving": (lambda p: _retensor(p, lambda t: t["proj_out.bias"].add_(1.0)), "has SHA-256"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_damaged_expert_entries_are_checkpoint_errors(done, tmp_path, case):
    damage, needle = HOSTILE[case]
    ck = copy_of(done.ck, tmp_path)
    damage(ck)
    with pytest.raises(CheckpointError) as e:
        svdquant.load_experts(ck)
    assert needle in str(e.value), str(e.value)


# ------------------------------------------------------------------------------------------------ before any work
def _no_call_during(pipe, call):
    seen = []
    handles = [m.register_forward_pre_hook(lambda *a: seen.append(1)) for m in (pipe.transformer, pipe.transformer_2)]
    try:
        call()
    finally:
        for h in handles:
            h.remove()
    assert not seen and not any(isinstance(x, SVDQLinear) for x in pipe.transformer_2.modules())


def test_a_calibration_that_misses_an_expert_is_refused_before_any_work():
    pipe = tm.build_wan_pipeline(two_experts=True)
    with pytest.raises(ValueError, match=r"runs transformer_2 on none of 1 calibration steps \(boundary_ratio 0.5 "
                                         r"splits them 1 \+ 0\): calibrate with more steps, e.g. "
                                         r"Calibration\(steps=2\) \(CLI: --steps 2\)"):
        _no_call_during(pipe, lambda: svdquant.quantize(pipe, RECIPE, calib(steps=1), progress=False))
    with pytest.raises(ValueError, match=r"holds one model's forward inputs: leave inputs out"):
        inputs = [tm.wan_inputs(pipe.transformer)]
        _no_call_during(pipe, lambda: svdquant.quantize(pipe, RECIPE, svdquant.Calibration(inputs=inputs),
                                                         progress=False))
    pipe.register_to_config(boundary_ratio=None)
    with pytest.raises(ValueError, match=r"has a transformer_2 but no boundary_ratio, so it never runs it"):
        _no_call_during(pipe, lambda: svdquant.quantize(pipe, RECIPE, calib(), progress=False))


def test_progress_names_the_expert(capsys, monkeypatch):
    monkeypatch.setenv("SVDQUANT_PROGRESS_SECONDS", "0")  # a line per step: stderr is no terminal here
    pipe = tm.build_wan_pipeline(two_experts=True)
    svdquant.quantize(pipe, RECIPE, calib(snapshots=1, prompts=["a cat"]), progress=True)
    err = capsys.readouterr().err
    order = [err.index(s) for s in ("calibrating transformer_2, expert 1 of 2", "quantizing transformer_2, expert 1 of 2",
                                    "calibrating transformer, expert 2 of 2", "quantizing transformer, expert 2 of 2")]
    assert order == sorted(order)


def test_a_lora_per_expert(done, tmp_path):
    """Wan 2.2's LoRAs come as a high- and a low-noise file: each loads into its expert, the other untouched."""
    from safetensors.torch import save_file as save

    pipe = done.pipe
    lin = pipe.transformer_2.blocks[0].attn1.to_q
    g = torch.Generator().manual_seed(3)
    save({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, lin.in_features, generator=g) * 0.1,
          "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.randn(lin.out_features, 4, generator=g) * 0.1},
         str(tmp_path / "low.safetensors"))
    before = {name: forward(getattr(pipe, name)) for name in ("transformer", "transformer_2")}
    svdquant.load_lora(pipe.transformer_2, tmp_path / "low.safetensors", name="low")
    try:
        assert svdquant.loaded_loras(pipe.transformer_2) == {"low": 1.0} and not svdquant.loaded_loras(pipe)
        assert torch.equal(forward(pipe.transformer), before["transformer"])
        assert not torch.equal(forward(pipe.transformer_2), before["transformer_2"])
    finally:
        svdquant.unload_lora(pipe.transformer_2, "low")
    assert torch.equal(forward(pipe.transformer_2), before["transformer_2"])


def test_a_hub_checkpoint_downloads_only_the_files_it_names(tmp_path, monkeypatch):
    """A hub id downloads svdquant.json first, then exactly the tensor files it names: the hub's patterns match across
    folders, so "transformer*.safetensors" would also take a diffusers repo's transformer/ shards. The hub is stood in
    for by a local folder served through huggingface_hub's own pattern filter (no network in tests)."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from svdquant.checkpoint.locate import resolve

    repo = tmp_path / "repo"
    files = ["svdquant.json", "README.md", "transformer.safetensors", "transformer_2.safetensors",
             "text_encoder_2.safetensors", "transformer/diffusion_pytorch_model.safetensors",
             "transformer_2/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors", "vae/x.bin"]
    for f in files:
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        (repo / f).write_text("x")
    (repo / "svdquant.json").write_text(json.dumps({"experts": {"transformer_2": {}, "../../etc/passwd": {}},
                                                    "text_encoders": {"text_encoder_2": {}, "*": {}}}))
    fetched = []

    def snapshot_download(repo_id, allow_patterns):
        got = list(filter_repo_objects([f for f in files if (repo / f).exists()], allow_patterns=allow_patterns))
        fetched.append(sorted(got))
        out = tmp_path / "cache" / repo_id
        for f in got:
            (out / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repo / f, out / f)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve("someone/wan-int4") == tmp_path / "cache" / "someone/wan-int4"
    assert fetched == [["README.md", "svdquant.json"],
                       ["README.md", "svdquant.json", "text_encoder_2.safetensors", "transformer.safetensors",
                        "transformer_2.safetensors"]]
    (repo / "svdquant.json").unlink()  # not a checkpoint (a diffusers repo): no weights fetched
    fetched.clear()
    resolve("someone/diffusers-repo")
    assert fetched == [["README.md"]]


def test_generate_refuses_one_lora_for_two_experts(done, tmp_path):
    import contextlib
    import io

    from svdquant.cli import main

    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["generate", str(done.ck), "a cat", "-o", str(tmp_path / "x.webp"), "--lora", str(lora),
                   "--device", "cpu"])
    lines = err.getvalue().strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "two experts" in lines[0] and "load_lora(pipe.transformer_2" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style.safetensors"]


def test_an_expert_file_given_alone_names_the_folder(done):
    with pytest.raises(CheckpointError, match=r"is the transformer_2 file of an svdquant checkpoint: pass the "
                                              r"checkpoint folder"):
        svdquant.load_quantized(done.ck / EXPERT_FILE)


def test_quantizing_again_is_refused_and_a_half_done_pipeline_finishes():
    """A model already quantized is refused (it would report nothing and record the new recipe over the old); a
    two-expert pipeline whose call stopped after one expert finishes with the other, leaving the first as it is."""
    pipe = tm.build_wan_pipeline(two_experts=True)
    svdquant.quantize(pipe.transformer_2, RECIPE, svdquant.Calibration(
        inputs=svdquant.calibration.record_inputs(pipe, pipe.transformer_2, calib(), progress=False)), progress=False)
    kept = {k: v.clone() for k, v in pipe.transformer_2.state_dict().items()}
    report = svdquant.quantize(pipe, RECIPE, calib(), progress=False)
    assert report.rows and not any(n.startswith("transformer_2.") for r in report.rows for n in r.names)
    assert type(pipe.transformer.blocks[0].attn1.to_q) is SVDQLinear
    assert all(torch.equal(v, pipe.transformer_2.state_dict()[k]) for k, v in kept.items())
    with pytest.raises(ValueError, match=r"^the WanTransformer3DModel is already quantized \(no 16-bit layer left"):
        svdquant.quantize(pipe, RECIPE, calib(), progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        svdquant.quantize(pipe.transformer, RECIPE, calib(), progress=False)
