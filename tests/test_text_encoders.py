"""4-bit text encoders (issue 15, part 2): ``svdquant.quantize(pipe, recipe, text_encoders=True)``.

On the tiny diffusers FluxPipeline (tests/tiny_models.py: a 1-layer CLIP and a 1-layer T5 from
configs, random weights): which layers are quantized and which stay 16-bit, the rounding rule
against hand-worked codes, the text embedding's error and the images' against the 16-bit
pipeline, T5's fp32 ``wo`` in fp16, save / load bit for bit (the loaded layers run the same ops on the same
tensors; T5's tied embedding stored once, the
base's own encoders never read), the other encoder families' layer choice, and every error.
"""

from __future__ import annotations

import json
import shutil
import statistics

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import svdquant
from svdquant import CheckpointError, SVDQLinear
from svdquant.algorithm import quantize_weight_only
from svdquant.checkpoint import META_FILE, TENSOR_FILE
from svdquant.metrics import psnr
from svdquant.models.text_encoders import encoder_layers

PROMPTS = ["a cat", "a red fox in the snow", "two ships at sea", "an old house"]
RECIPE = svdquant.Int4Config(iterations=3, eval_tokens=128)
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def embeds(pipe):
    """(T5 token embeddings, CLIP pooled vector): what the FLUX transformer reads from the encoders."""
    with torch.no_grad():
        return pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=tm.PIPE_KWARGS["max_sequence_length"])[:2]


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def linears(module) -> set[str]:
    return {n for n, m in module.named_modules() if isinstance(m, nn.Linear)}


def quantized(module) -> set[str]:
    return {n for n, m in module.named_modules() if isinstance(m, SVDQLinear)}


@pytest.fixture(scope="module")
def ref():
    return tm.build_flux_pipeline(0)


@pytest.fixture(scope="module")
def qpipe():
    """The same pipeline with its two text encoders quantized (transformer 16-bit) and the report."""
    pipe = tm.build_flux_pipeline(0)
    report = svdquant.quantize_text_encoders(pipe, progress=False)
    return pipe, report


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """int4 transformer + 4-bit text encoders through ``quantize(..., text_encoders=True)``, saved with
    ``save_quantized(pipe, ...)`` next to the saved 16-bit base pipeline: (pipe, report, checkpoint, base)."""
    root = tmp_path_factory.mktemp("te")
    base = tm.save_flux_pipeline(root / "base")
    pipe = tm.build_flux_pipeline(0)
    calib = svdquant.Calibration(prompts=PROMPTS, steps=2, snapshots=4, pipeline_kwargs=tm.PIPE_KWARGS)
    report = svdquant.quantize(pipe, RECIPE, calib, text_encoders=True, progress=False)
    path = svdquant.save_quantized(pipe, root / "ck", base=str(base), report=report)
    return pipe, report, path, base


# ------------------------------------------------------------------------------------------------ what is quantized
def test_every_block_linear_quantized_the_rest_16bit(ref, qpipe):
    pipe, _ = qpipe
    for name in ("text_encoder", "text_encoder_2"):
        before, after = getattr(ref, name), getattr(pipe, name)
        stack = "encoder.block" if name == "text_encoder_2" else "encoder.layers"
        want = {n for n in linears(before) if n.startswith(stack + ".")}
        assert want and quantized(after) == want == linears(before)  # these tiny encoders have no linear outside
        assert not linears(after)
        for layer in want:
            q = after.get_submodule(layer)
            assert (q.weights, q.activations, q.group_size, q.rank) == ("int4", None, 64, 0)
        # embeddings, norms, T5's relative-attention bias and final norm: untouched, bit for bit
        kept = {k: v for k, v in before.state_dict().items() if k.rsplit(".", 1)[0] not in want}
        assert any("embed" in k for k in kept) and any("norm" in k for k in kept)
        got = after.state_dict()
        for k, v in kept.items():
            assert torch.equal(got[k], v), k
    assert pipe.text_encoder_2.encoder.final_layer_norm.weight.dtype == torch.float32
    assert isinstance(pipe.text_encoder_2.shared, nn.Embedding)
    assert pipe.text_encoder_2.shared.weight is pipe.text_encoder_2.encoder.embed_tokens.weight  # still tied


def test_report_rows_and_sizes(qpipe):
    pipe, report = qpipe
    assert report.rows == [] and len(report.text_encoder_rows) == 12
    names = [r.names[0] for r in report.text_encoder_rows]
    assert "text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wo" in names
    for r in report.text_encoder_rows:
        assert (r.weights, r.activations, r.rank) == ("int4", None, 0)
        assert 0.05 < r.rel_error < 0.15 and r.rel_error == r.rel_error_naive  # INT4 g64 on Gaussian weights
    te = report.text_encoders["text_encoder_2"]
    assert te["class"] == "T5EncoderModel" and te["layers"] == 6 and te["kept"] == 0
    t5 = tm.build_flux_pipeline(0).text_encoder_2
    assert te["bytes_16bit"] == sum(p.numel() * 4 for p in t5.parameters())  # the tied embedding once
    # fp32 weights 4 B -> INT4 0.5 B + one fp32 scale per 64: what is left is the 16-bit embedding and norms
    assert te["bytes_quantized"] < te["bytes_16bit"] * 0.6
    text = str(report)
    assert "text_encoder_2 (T5EncoderModel): 6 linears int4 weight-only, group 64" in text
    assert "groups quantized" not in text
    assert report.to_dict()["text_encoders"]["text_encoder"]["class"] == "CLIPTextModel"


def test_weight_only_rounding_known_answer():
    # one row of 64: the group's absmax is 7, so the scale is 1 and the codes are round-half-even(w)
    w = torch.tensor([[7.0, -2.5, 0.5, 1.5, 3.49, -6.6] + [0.0] * 58])
    (qw, rep) = quantize_weight_only(w, torch.tensor([0.25]), svdquant.get_recipe("w4a16"))
    assert qw.weight.scales.tolist() == [[1.0]]
    assert qw.weight.codes[0, :6].tolist() == [7, -2, 0, 2, 3, -7]
    err = (torch.tensor([0.0, -0.5, 0.5, -0.5, 0.49, 0.4])).norm() / w.norm()
    assert rep.rel_error == pytest.approx(float(err), rel=1e-6)
    layer = SVDQLinear.from_quantized(qw, svdquant.get_recipe("w4a16"), torch.float32)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    deq = torch.tensor([[7.0, -2, 0, 2, 3, -7] + [0.0] * 58])
    assert torch.equal(layer(x), x @ deq.T + 0.25)
    with pytest.raises(ValueError, match="weight-only recipe"):
        quantize_weight_only(w, None, svdquant.get_recipe("int4"))


def test_nf4_text_encoders():
    pipe, ref = tm.build_flux_pipeline(0), tm.build_flux_pipeline(0)
    report = svdquant.quantize_text_encoders(pipe, "nf4", progress=False)
    assert {pipe.text_encoder_2.get_submodule(n).weights for n in encoder_layers(ref.text_encoder_2)} == {"nf4"}
    assert report.text_encoders["text_encoder_2"]["weights"] == "nf4"
    assert 0.02 < rel(embeds(pipe)[0], embeds(ref)[0]) < 0.2


# ------------------------------------------------------------------------------------------------ the figures
def test_text_embedding_error(ref, qpipe):
    """The tiny encoders' error: weight error ~0.10 (random Gaussian weights, INT4 g64), and the embedding's
    about the same (one block, nothing to average it out). Measured: T5 0.112, CLIP pooled 0.218."""
    (t5_ref, pooled_ref), (t5, pooled) = embeds(ref), embeds(qpipe[0])
    assert t5.dtype == t5_ref.dtype and t5.shape == t5_ref.shape
    assert 0.05 < rel(t5, t5_ref) < 0.15
    assert 0.05 < rel(pooled, pooled_ref) < 0.30


def test_end_to_end_effect_on_images(ref, qpipe, full):
    """Images against the 16-bit pipeline, 4 prompts, 4 steps. Measured: 4-bit text encoders alone 51.0-56.9 dB
    PSNR; int4 transformer alone 66.7 dB mean; both 53.5 dB mean."""
    i_ref = tm.sample(ref, PROMPTS, steps=4)
    te_only = psnr(tm.sample(qpipe[0], PROMPTS, steps=4), i_ref)
    assert te_only.min() > 45 and te_only.max() < 70  # changed, and little
    both = psnr(tm.sample(full[0], PROMPTS, steps=4), i_ref)
    assert both.mean() > 45


def test_transformer_calibrated_on_16bit_encoders(full, ref):
    """text_encoders=True quantizes the encoders after the transformer: the transformer is the one
    quantize() makes without them, bit for bit."""
    pipe = tm.build_flux_pipeline(0)
    calib = svdquant.Calibration(prompts=PROMPTS, steps=2, snapshots=4, pipeline_kwargs=tm.PIPE_KWARGS)
    svdquant.quantize(pipe, RECIPE, calib, progress=False)
    a, b = pipe.transformer.state_dict(), full[0].transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not quantized(pipe.text_encoder_2) and quantized(full[0].text_encoder_2)


def test_t5_in_fp16_keeps_wo_in_fp32(tmp_path, ref):
    """transformers loads a T5 in fp16 with ``wo`` in fp32 and casts wo's input to ``wo.weight.dtype``: the
    quantized wo keeps fp32 (its scales too) and the cast still happens."""
    from transformers import T5EncoderModel

    ref.text_encoder_2.save_pretrained(tmp_path / "t5")
    te = T5EncoderModel.from_pretrained(tmp_path / "t5", dtype=torch.float16).eval()
    assert te.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    ids = ref.tokenizer_2(PROMPTS, padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        before = te(ids)[0]

    class Holder:
        text_encoder = te

    svdquant.quantize_text_encoders(Holder(), progress=False)
    wo = te.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, SVDQLinear) and wo.dtype == torch.float32 and wo.wscales.dtype == torch.float32
    assert wo.weight.dtype == torch.float32 and wo.weight.numel() == 0
    q = te.encoder.block[0].layer[0].SelfAttention.q
    assert q.wscales.dtype == torch.float16 and "weight" not in vars(q)
    seen = []
    wo.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with torch.no_grad():
        after = te(ids)[0]
    assert seen == [torch.float32]  # the cast to wo.weight.dtype, as in the 16-bit model
    assert after.dtype == before.dtype and torch.isfinite(after).all()
    assert 0 < rel(after, before) < 0.2


# ------------------------------------------------------------------------------------------------ save / load
def test_save_writes_each_encoder_once_with_version_3(full):
    pipe, _, path, _ = full
    meta = json.loads((path / META_FILE).read_text())
    assert meta["format_version"] == 3
    assert sorted(p.name for p in path.iterdir()) == [META_FILE, "text_encoder.safetensors",
                                                     "text_encoder_2.safetensors", TENSOR_FILE]
    t5 = meta["text_encoders"]["text_encoder_2"]
    assert t5["model_class"] == "T5EncoderModel" and t5["recipe"]["name"] == "w4a16"
    assert sorted(t5["layers"]) == sorted(encoder_layers(tm.build_flux_pipeline(0).text_encoder_2))
    assert t5["tied"] == {"encoder.embed_tokens.weight": "shared.weight"}
    stored = load_file(str(path / "text_encoder_2.safetensors"))
    assert "shared.weight" in stored and "encoder.embed_tokens.weight" not in stored
    assert meta["report"]["text_encoders"]["text_encoder_2"]["layers"] == 6


def test_model_card_lists_the_text_encoders(full):
    from svdquant.checkpoint.card import render

    text = render(svdquant.read_metadata(full[2]))
    assert "## Text encoders" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| `text_encoder_2` |"))
    errs = sorted(r.rel_error for r in full[1].text_encoder_rows if r.names[0].startswith("text_encoder_2."))
    figures = f"{statistics.median(errs):.4f} / {errs[-1]:.4f}"
    assert row == f"| `text_encoder_2` | T5EncoderModel | 6 | Wint4 A16 g64 | {figures} |"
    assert "run the torch reference" in text


def test_transformer_only_checkpoint_keeps_version_2(tmp_path):
    model = tm.build_flux(0)
    svdquant.quantize(model, RECIPE, svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 2)),
                      progress=False)
    meta = svdquant.read_metadata(svdquant.save_quantized(model, tmp_path / "ck"))
    assert meta["format_version"] == 2 and "text_encoders" not in meta  # older svdquant still reads it


def test_load_pipeline_bit_exact(full):
    pipe, _, path, _ = full
    loaded = svdquant.load_pipeline(None, path)
    for name in ("text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, name), getattr(loaded, name)
        assert type(b) is type(a) and quantized(b) == quantized(a)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    t5 = loaded.text_encoder_2
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # tied again: one tensor, moved once by .to()
    assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.numel() == 0  # T5's dtype probe is restored
    (e1, p1), (e2, p2) = embeds(pipe), embeds(loaded)
    assert torch.equal(e1, e2) and torch.equal(p1, p2)
    assert torch.equal(tm.sample(pipe, PROMPTS[:2], steps=2), tm.sample(loaded, PROMPTS[:2], steps=2))
    assert svdquant.load_text_encoders(path).keys() == {"text_encoder", "text_encoder_2"}


def test_load_pipeline_never_reads_the_base_encoders(full, tmp_path):
    """The checkpoint's encoders replace the base's: those are not loaded (a 9.5 GB T5-XXL is never read)."""
    _, _, path, base = full
    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    for sub in ("text_encoder", "text_encoder_2"):
        for f in (copy / sub).glob("*.safetensors"):
            f.write_bytes(b"not a tensor file")
    ck = tmp_path / "ck"
    shutil.copytree(path, ck)
    loaded = svdquant.load_pipeline(copy, ck)
    assert quantized(loaded.text_encoder_2)
    with pytest.raises(Exception):  # the damage is real: the 16-bit base itself no longer loads
        from svdquant.pipelines import load_base_pipeline

        load_base_pipeline(copy)


def test_save_transformer_alone_warns(full, tmp_path):
    pipe = full[0]
    with pytest.warns(UserWarning, match=r"save_quantized\(pipe, \.\.\.\) saves them"):
        svdquant.save_quantized(pipe.transformer, tmp_path / "ck")
    assert "text_encoders" not in svdquant.read_metadata(tmp_path / "ck")


# ------------------------------------------------------------------------------------------------ other encoders
def test_layer_choice_of_other_encoder_families():
    """SD3's CLIP with projection, UMT5 / T5 v1.1 (gated), Qwen-Image's Qwen2.5-VL, SANA's Gemma 2: the
    linears of the block stack; the projection, the vision tower and lm_head stay 16-bit."""
    import transformers as T

    torch.manual_seed(0)
    clip = T.CLIPTextModelWithProjection(T.CLIPTextConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    umt5 = T.UMT5EncoderModel(T.UMT5Config(vocab_size=64, d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2,
                                           feed_forward_proj="gated-gelu"))
    qwen = T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=1, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=2, window_size=8, fullatt_block_indexes=[0])))
    gemma = T.Gemma2Model(T.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    attn_mlp = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj"]
    assert set(encoder_layers(clip)) == {f"text_model.encoder.layers.0.{n}" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")}
    assert linears(clip) - set(encoder_layers(clip)) == {"text_projection"}
    assert set(encoder_layers(umt5)) == {f"encoder.block.0.layer.{n}" for n in (
        "0.SelfAttention.q", "0.SelfAttention.k", "0.SelfAttention.v", "0.SelfAttention.o",
        "1.DenseReluDense.wi_0", "1.DenseReluDense.wi_1", "1.DenseReluDense.wo")}
    assert set(encoder_layers(qwen)) == {f"model.language_model.layers.0.{n}" for n in attn_mlp}
    kept = linears(qwen) - set(encoder_layers(qwen))
    assert "lm_head" in kept and all(n.startswith("model.visual.") for n in kept - {"lm_head"})
    assert set(encoder_layers(gemma)) == {f"layers.0.{n}" for n in attn_mlp}

    class Holder:
        text_encoder, text_encoder_3 = clip, umt5

    report = svdquant.quantize_text_encoders(Holder(), progress=False)
    assert report.text_encoders["text_encoder"]["kept"] == 1 and report.text_encoders["text_encoder_3"]["layers"] == 7
    assert isinstance(clip.text_projection, nn.Linear)
    assert umt5.encoder.block[0].layer[1].DenseReluDense.wo.weight.numel() == 0


# ------------------------------------------------------------------------------------------------ errors
def test_api_errors_before_any_work(ref):
    from svdquant.pipelines import TinyFluxPipeline

    pipe = tm.build_flux_pipeline(0)
    calib = svdquant.Calibration(prompts=PROMPTS[:1], steps=1, snapshots=1, pipeline_kwargs=tm.PIPE_KWARGS)
    cases = [
        (dict(target=pipe.transformer, text_encoders=True, calibration=svdquant.Calibration(
            inputs=tm.calibration_inputs("flux", pipe.transformer, 1))), ValueError, "pass the pipeline itself"),
        (dict(target=pipe, text_encoders="yes"), TypeError, "text_encoders= takes True or False"),
        (dict(target=TinyFluxPipeline.random(num_layers=1, num_single_layers=1), text_encoders=True,
              calibration=svdquant.Calibration(num_prompts=1)), ValueError, "has no text encoder"),
    ]
    for kw, exc, needle in cases:
        target = kw.pop("target")
        with pytest.raises(exc) as e:
            svdquant.quantize(target, RECIPE, **{"calibration": calib, **kw}, progress=False)
        assert needle in str(e.value) and "\n" not in str(e.value)
    assert not quantized(pipe.transformer) and not quantized(pipe.text_encoder_2)  # nothing was touched

    with pytest.raises(ValueError, match="weight-only; recipe 'int4' is not"):
        svdquant.quantize_text_encoders(pipe, "int4", progress=False)
    with pytest.raises(TypeError, match="recipe= takes"):
        svdquant.quantize_text_encoders(pipe, 4, progress=False)

    class Odd:
        text_encoder = nn.Sequential(nn.Linear(4, 4))

    with pytest.raises(ValueError, match="does not know where Sequential keeps its blocks"):
        svdquant.quantize_text_encoders(Odd(), progress=False)
    svdquant.quantize_text_encoders(pipe, progress=False)
    with pytest.raises(ValueError, match="text_encoder .CLIPTextModel. is already quantized"):
        svdquant.quantize_text_encoders(pipe, progress=False)


def _edit(path, change):
    meta = json.loads((path / META_FILE).read_text())
    change(meta)
    (path / META_FILE).write_text(json.dumps(meta))


def _retensor(path, change):
    f = path / "text_encoder_2.safetensors"
    t = load_file(str(f))
    change(t)
    save_file(t, str(f))


CORRUPT = {
    "file-missing": (lambda p: (p / "text_encoder_2.safetensors").unlink(), "text_encoder_2.safetensors is missing"),
    "name-is-a-path": (lambda p: _edit(p, lambda m: m["text_encoders"].update(
        {"../evil": m["text_encoders"].pop("text_encoder_2")})), "names a text encoder '../evil'"),
    "old-version": (lambda p: _edit(p, lambda m: m.update(format_version=2)), "holds text encoders but says format"),
    "newer-version": (lambda p: _edit(p, lambda m: m.update(format_version=99)), "Upgrade svdquant"),
    "not-a-dict": (lambda p: _edit(p, lambda m: m.update(text_encoders=[1])), "malformed 'text_encoders'"),
    "entry-keys": (lambda p: _edit(p, lambda m: m["text_encoders"]["text_encoder_2"].pop("layers")),
                   "it needs model_class, model_config and layers"),
    "layer-entry": (lambda p: _edit(p, lambda m: m["text_encoders"]["text_encoder_2"]["layers"][
        "encoder.block.0.layer.0.SelfAttention.q"].update(in_features=-1)), "in_features = -1"),
    "unknown-class": (lambda p: _edit(p, lambda m: m["text_encoders"]["text_encoder_2"].update(
        model_class="NoSuchEncoderModel")), "'NoSuchEncoderModel', which this transformers"),
    "not-a-model": (lambda p: _edit(p, lambda m: m["text_encoders"]["text_encoder_2"].update(
        model_class="T5Config")), "is not a transformers model"),
    "huge-config": (lambda p: _edit(p, lambda m: m["text_encoders"]["text_encoder_2"]["model_config"].update(
        num_layers=100_000)), "num_layers = 100000, but the tensor file holds only"),
    "tie-not-shared": (lambda p: _edit(p, lambda m: m["text_encoders"]["text_encoder_2"].update(
        tied={"encoder.final_layer_norm.weight": "shared.weight"})), "which T5EncoderModel does not share"),
    "layer-not-in-model": (lambda p: _edit(p, lambda m: m["text_encoders"]["text_encoder_2"]["layers"].update(
        {"encoder.block.0.nope": m["text_encoders"]["text_encoder_2"]["layers"][
            "encoder.block.0.layer.0.SelfAttention.q"]})), "quantizes layer 'encoder.block.0.nope'"),
    "extra-tensor": (lambda p: _retensor(p, lambda t: t.update(extra=torch.zeros(1))),
                     "tensors the model does not use"),
    "missing-tensor": (lambda p: _retensor(p, lambda t: t.pop("shared.weight")), "lacks 1 tensors"),
    "nan-in-scales": (lambda p: _retensor(p, lambda t: t["encoder.block.0.layer.0.SelfAttention.q.wscales"].fill_(
        float("nan"))), "NaN / Inf values"),
    "truncated": (lambda p: (p / "text_encoder_2.safetensors").write_bytes(
        (p / "text_encoder_2.safetensors").read_bytes()[:-10]), "truncated or corrupt"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_damaged_text_encoder_entries_are_checkpoint_errors(full, tmp_path, case):
    damage, needle = CORRUPT[case]
    ck = tmp_path / "ck"
    shutil.copytree(full[2], ck)
    damage(ck)
    with pytest.raises(CheckpointError) as e:
        svdquant.load_pipeline(full[3], ck)
    assert needle in str(e.value), str(e.value)


def test_save_takes_a_pipeline_only_with_a_transformer(tmp_path):
    class UNetPipeline:  # SDXL's layout: save pipe.unet itself
        unet = nn.Linear(2, 2)

    with pytest.raises(TypeError, match=r"pipe.unet\) or a pipeline with a .transformer, got UNetPipeline"):
        svdquant.save_quantized(UNetPipeline(), tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
