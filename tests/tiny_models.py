"""Tiny random-weight diffusers transformers and pipelines for the model / checkpoint / CLI tests.

Nothing here downloads anything: every model is built from a config with fixed-seed random
weights, and the tiny FLUX pipeline's tokenizers are written from a small vocabulary.

``ARCHS`` maps an architecture name to ``(build, make_inputs)`` (``ALL_ARCHS`` adds ``MORE_ARCHS``):

* ``build(seed=0, dtype=torch.float32)`` -> the transformer in eval mode;
* ``make_inputs(model, seed=0, batch=1)`` -> keyword arguments for one forward call
  (one calibration snapshot), with ``return_dict=False``.

Sizes: hidden width 64 (2 heads x 32), one block per stack, 16 image tokens and 4-6 text
tokens, so one quantization takes about a second on one CPU thread.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import string  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# the tests that run the GPU's kernels in Triton's interpreter, on CPU machines (conftest.py sets TRITON_INTERPRET)
interpreted = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the interpreter runs the kernels on CPU machines")

# --------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------

HIDDEN = 64  # width of every tiny transformer (2 heads x 32)

FLUX_CONFIG = dict(
    patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
    attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
    guidance_embeds=False, axes_dims_rope=(8, 12, 12),
)

SD3_CONFIG = dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32,
    num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=HIDDEN, pooled_projection_dim=32,
    pos_embed_max_size=16,
)

PIXART_CONFIG = dict(
    num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=1,
    cross_attention_dim=HIDDEN, norm_num_groups=32, sample_size=8, patch_size=2, caption_channels=32,
    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, use_additional_conditions=False,
)

SANA_CONFIG = dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
    num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=HIDDEN, caption_channels=32,
    mlp_ratio=2.5, sample_size=8, patch_size=2,
)

QWENIMAGE_CONFIG = dict(
    patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=32, num_attention_heads=2,
    joint_attention_dim=32, axes_dims_rope=(8, 12, 12),
)

# SDXL's layout (linear proj_in/proj_out, GEGLU feed-forward, text_time added conditions) at width 64:
# a 32-channel DownBlock2D, then a 64-channel cross-attention level (one transformer block in the
# down, mid and each up attention), 8x8 latents.
SDXL_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, HIDDEN), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(1, 2), transformer_layers_per_block=1, use_linear_projection=True,
    cross_attention_dim=HIDDEN, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8,
)

# FLUX.2 / [klein]: SwiGLU feed-forwards 3x wide (192 = 3 x 64), four RoPE axes of 8 (one head of 32).
FLUX2_CONFIG = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
    joint_attention_dim=32, timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(8, 8, 8, 8),
    guidance_embeds=False,
)

# Z-Image: width 192 so that its SwiGLU's int(dim / 3 * 8) = 512 is whole groups of 64 (at 64 it would be 170);
# one block per stack (noise refiner, context refiner, main layers).
ZIMAGE_CONFIG = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=192, n_layers=1, n_refiner_layers=1, n_heads=2,
    n_kv_heads=2, cap_feat_dim=32, axes_dims=[32, 32, 32], axes_lens=[64, 32, 32],
)

# Wan 2.1 text-to-video layout; patch (1, 2, 2): 2 latent frames of 8 x 8 are 32 tokens.
WAN_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16, text_dim=32,
    freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=32,
)

TEXT_TOKENS = 6


def _build(cls, config: dict, seed: int, dtype: torch.dtype):
    from diffusers.utils import logging as dlogging

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**config)
    if dtype != torch.float32:
        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # "modules that should be kept in float32: []"
        try:
            model = model.to(dtype)
        finally:
            dlogging.set_verbosity(level)
    return model.eval()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dtype_of(model) -> torch.dtype:
    return next(model.parameters()).dtype


# --------------------------------------------------------------------------------------
# FLUX
# --------------------------------------------------------------------------------------

def build_flux(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from diffusers import FluxTransformer2DModel

    return _build(FluxTransformer2DModel, {**FLUX_CONFIG, **overrides}, seed, dtype)


def flux_inputs(model, seed: int = 0, batch: int = 1) -> dict:
    cfg, dt, g = model.config, _dtype_of(model), _gen(seed)
    side = 4  # 4 x 4 = 16 image tokens
    ii, jj = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(ii), ii, jj], -1).reshape(-1, 3).float()
    return dict(
        hidden_states=torch.randn(batch, side * side, cfg.in_channels, generator=g).to(dt),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, cfg.joint_attention_dim, generator=g).to(dt),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dt),
        timestep=torch.rand(batch, generator=g).to(dt),
        img_ids=img_ids,
        txt_ids=torch.zeros(TEXT_TOKENS, 3),
        return_dict=False,
    )


# --------------------------------------------------------------------------------------
# SD3
# --------------------------------------------------------------------------------------

def build_sd3(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from diffusers import SD3Transformer2DModel

    return _build(SD3Transformer2DModel, {**SD3_CONFIG, **overrides}, seed, dtype)


def sd3_inputs(model, seed: int = 0, batch: int = 1) -> dict:
    cfg, dt, g = model.config, _dtype_of(model), _gen(seed)
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, 8, 8, generator=g).to(dt),  # 4 x 4 = 16 patches
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, cfg.joint_attention_dim, generator=g).to(dt),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dt),
        timestep=(torch.rand(batch, generator=g) * 1000).to(dt),
        return_dict=False,
    )


# --------------------------------------------------------------------------------------
# PixArt-Sigma
# --------------------------------------------------------------------------------------

def build_pixart(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from diffusers import PixArtTransformer2DModel

    return _build(PixArtTransformer2DModel, {**PIXART_CONFIG, **overrides}, seed, dtype)


def pixart_inputs(model, seed: int = 0, batch: int = 1) -> dict:
    cfg, dt, g = model.config, _dtype_of(model), _gen(seed)
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, 8, 8, generator=g).to(dt),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, cfg.caption_channels, generator=g).to(dt),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )


# --------------------------------------------------------------------------------------
# SANA
# --------------------------------------------------------------------------------------

def build_sana(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from diffusers import SanaTransformer2DModel

    return _build(SanaTransformer2DModel, {**SANA_CONFIG, **overrides}, seed, dtype)


def sana_inputs(model, seed: int = 0, batch: int = 1) -> dict:
    cfg, dt, g = model.config, _dtype_of(model), _gen(seed)
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, 8, 8, generator=g).to(dt),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, cfg.caption_channels, generator=g).to(dt),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        return_dict=False,
    )


# --------------------------------------------------------------------------------------
# Qwen-Image
# --------------------------------------------------------------------------------------

def build_qwenimage(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from diffusers import QwenImageTransformer2DModel

    return _build(QwenImageTransformer2DModel, {**QWENIMAGE_CONFIG, **overrides}, seed, dtype)


def qwenimage_inputs(model, seed: int = 0, batch: int = 1) -> dict:
    cfg, dt, g = model.config, _dtype_of(model), _gen(seed)
    side = 4  # 4 x 4 = 16 packed (2x2-patch) image tokens
    return dict(
        hidden_states=torch.randn(batch, side * side, cfg.in_channels, generator=g).to(dt),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, cfg.joint_attention_dim, generator=g).to(dt),
        encoder_hidden_states_mask=torch.ones(batch, TEXT_TOKENS, dtype=torch.long),
        timestep=torch.rand(batch, generator=g).to(dt),
        img_shapes=[[(1, side, side)]] * batch,
        return_dict=False,
    )


# --------------------------------------------------------------------------------------
# SDXL (UNet)
# --------------------------------------------------------------------------------------

def build_sdxl(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from diffusers import UNet2DConditionModel

    return _build(UNet2DConditionModel, {**SDXL_CONFIG, **overrides}, seed, dtype)


def sdxl_inputs(model, seed: int = 0, batch: int = 1) -> dict:
    cfg, dt, g = model.config, _dtype_of(model), _gen(seed)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    # time_ids: original size, crop top-left, target size, as SDXL's pipeline builds them
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1)
    return dict(
        sample=torch.randn(batch, cfg.in_channels, 8, 8, generator=g).to(dt),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, cfg.cross_attention_dim, generator=g).to(dt),
        added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, generator=g).to(dt), "time_ids": time_ids.to(dt)},
        return_dict=False,
    )


# --------------------------------------------------------------------------------------
# FLUX.2
# --------------------------------------------------------------------------------------

def build_flux2(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from diffusers import Flux2Transformer2DModel

    return _build(Flux2Transformer2DModel, {**FLUX2_CONFIG, **overrides}, seed, dtype)


def flux2_inputs(model, seed: int = 0, batch: int = 1) -> dict:
    cfg, dt, g = model.config, _dtype_of(model), _gen(seed)
    side = 4  # 16 image tokens; ids (t, h, w, l) as Flux2Pipeline makes them
    ii, jj = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(ii), ii, jj, torch.zeros_like(ii)], -1).reshape(-1, 4)
    txt_ids = torch.stack([torch.zeros(TEXT_TOKENS), torch.zeros(TEXT_TOKENS), torch.zeros(TEXT_TOKENS),
                           torch.arange(TEXT_TOKENS).float()], -1)
    return dict(
        hidden_states=torch.randn(batch, side * side, cfg.in_channels, generator=g).to(dt),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, cfg.joint_attention_dim, generator=g).to(dt),
        timestep=torch.rand(batch, generator=g).to(dt),
        img_ids=img_ids.float(),
        txt_ids=txt_ids,
        return_dict=False,
    )


# --------------------------------------------------------------------------------------
# Z-Image
# --------------------------------------------------------------------------------------

def build_zimage(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from diffusers import ZImageTransformer2DModel

    return _build(ZImageTransformer2DModel, {**ZIMAGE_CONFIG, **overrides}, seed, dtype)


def zimage_inputs(model, seed: int = 0, batch: int = 1) -> dict:
    """Z-Image takes lists: per image ``[C, 1, H, W]`` latents (8 x 8: 16 tokens of 2x2) and its caption features."""
    cfg, dt, g = model.config, _dtype_of(model), _gen(seed)
    return dict(
        x=[torch.randn(cfg.in_channels, 1, 16, 16, generator=g).to(dt) for _ in range(batch)],
        t=torch.rand(batch, generator=g).to(dt),
        cap_feats=[torch.randn(TEXT_TOKENS, cfg.cap_feat_dim, generator=g).to(dt) for _ in range(batch)],
        return_dict=False,
    )


# --------------------------------------------------------------------------------------
# Wan (video)
# --------------------------------------------------------------------------------------

def build_wan(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from diffusers import WanTransformer3DModel

    return _build(WanTransformer3DModel, {**WAN_CONFIG, **overrides}, seed, dtype)


def wan_inputs(model, seed: int = 0, batch: int = 1) -> dict:
    cfg, dt, g = model.config, _dtype_of(model), _gen(seed)
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, 2, 8, 8, generator=g).to(dt),  # 2 x 4 x 4 = 32 tokens
        timestep=(torch.rand(batch, generator=g) * 1000).to(dt),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, cfg.text_dim, generator=g).to(dt),
        return_dict=False,
    )


ARCHS = {
    "flux": (build_flux, flux_inputs),
    "flux2": (build_flux2, flux2_inputs),
    "wan": (build_wan, wan_inputs),
    "sd3": (build_sd3, sd3_inputs),
    "pixart": (build_pixart, pixart_inputs),
    "sana": (build_sana, sana_inputs),
    "qwenimage": (build_qwenimage, qwenimage_inputs),
    "sdxl": (build_sdxl, sdxl_inputs),
}


# Z-Image's config names its sizes dim / n_layers / n_heads, not num_layers / attention_head_dim...: it is tested
# where the tests read the model, not the config's names (test_models, test_diffusers_quantizer, test_checkpoint,
# test_lora_models).
MORE_ARCHS = {"zimage": (build_zimage, zimage_inputs)}
ALL_ARCHS = {**ARCHS, **MORE_ARCHS}


def calibration_inputs(arch: str, model, n: int = 2, seed: int = 100) -> list[dict]:
    """``n`` snapshots (forward kwargs) for ``model``; seeds ``seed``, ``seed + 1``..."""
    make = ALL_ARCHS[arch][1]
    return [make(model, seed=seed + i) for i in range(n)]


def forward(model, kwargs: dict) -> torch.Tensor:
    """The model's output tensor for one set of forward kwargs."""
    with torch.no_grad():
        out = model(**kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else out.sample
    return torch.stack(out) if isinstance(out, list) else out  # Z-Image returns a list, one tensor per image


# --------------------------------------------------------------------------------------
# a tiny diffusers FluxPipeline, built offline
# --------------------------------------------------------------------------------------

# Arguments that keep a tiny FluxPipeline call small: 16x16 pixels -> 8x8 latents -> 16 tokens,
# 8 T5 tokens (the pipeline's default is 512).
PIPE_KWARGS = dict(height=16, width=16, max_sequence_length=8)
CLIP_MAX_LENGTH = 16


def clip_tokenizer():
    """A CLIPTokenizer over single letters (BPE with no merges), built from a vocab.json-style dict."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
    for c in string.ascii_lowercase:
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer():
    """A T5 (Unigram) tokenizer over single letters, built from a (piece, score) list."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -1.0) for c in string.ascii_lowercase] + [(c, -2.0) for c in string.ascii_lowercase]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def tiny_text_encoders(clip_width: int = FLUX_CONFIG["pooled_projection_dim"],
                       t5_width: int = FLUX_CONFIG["joint_attention_dim"]) -> dict:
    """FluxPipeline's text side, one layer each, from torch's current random state: a CLIP whose pooled output
    is ``clip_width`` wide and a T5 encoder ``t5_width`` wide, with the letter tokenizers above. A FLUX-size
    pipeline gets FLUX.1's widths (768, 4096) at a few million parameters."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=clip_width, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=32,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tok2), d_model=t5_width, d_ff=64, d_kv=16, num_layers=1,
        num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))
    # freshly built transformers models are in training mode: T5's dropout would make sampling random
    return dict(text_encoder=text_encoder.eval(), tokenizer=tok, text_encoder_2=text_encoder_2.eval(), tokenizer_2=tok2)


def build_flux_pipeline(seed: int = 0):
    """A diffusers ``FluxPipeline`` with tiny random components (transformer = :func:`build_flux`)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        text = tiny_text_encoders()
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
            latent_channels=FLUX_CONFIG["in_channels"] // 4, norm_num_groups=8, sample_size=16,
            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0,
        )
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), transformer=build_flux(seed),
                        **text)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_flux_pipeline(folder, seed: int = 0) -> Path:
    """Build :func:`build_flux_pipeline` and ``save_pretrained`` it to ``folder`` (a diffusers layout)."""
    folder = Path(folder)
    build_flux_pipeline(seed).save_pretrained(folder)
    return folder


def sample(pipe, prompt: str = "a cat", steps: int = 2, seed: int = 0, **kwargs) -> torch.Tensor:
    """``pipe(prompt)`` as a ``[B, 3, H, W]`` tensor in [0, 1], fixed noise, tiny sizes."""
    kw = {**PIPE_KWARGS, **kwargs}
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                    output_type="pt", **kw).images


def watch_loading(monkeypatch) -> list[str]:
    """While a checkpoint loads: record the device of every weight initialization (all must be "meta": no
    16-bit weight is materialized) and fail if anything quantizes. Returns the list it fills."""
    from svdquant import SVDQLinear

    inits: list[str] = []
    for fn in ("kaiming_uniform_", "uniform_", "normal_", "xavier_uniform_", "zeros_", "ones_", "constant_",
               "trunc_normal_"):
        orig = getattr(torch.nn.init, fn)

        def wrapped(tensor, *a, _orig=orig, **k):
            inits.append(tensor.device.type)
            return _orig(tensor, *a, **k)

        monkeypatch.setattr(torch.nn.init, fn, wrapped)

    def no_quantizing(*a, **k):
        raise AssertionError("loading must not quantize")

    monkeypatch.setattr(SVDQLinear, "from_linears", no_quantizing)
    return inits


def watch_quantized_builds(monkeypatch) -> list[str]:
    """The device every SVDQLinear is built on ("default" when none is given): a loader must build them on "meta"
    and fill them from the file. Returns the list it fills."""
    from svdquant import SVDQLinear

    built: list[str] = []
    real_init = SVDQLinear.__init__

    def spy(self, *a, device=None, **k):
        built.append(torch.device(device).type if device is not None else "default")
        real_init(self, *a, device=device, **k)

    monkeypatch.setattr(SVDQLinear, "__init__", spy)
    return built


def run_fresh_python(code: str) -> str:
    """``code`` run in a new Python process with this checkout importable (what a user's fresh ``import svdquant``
    sees); its stdout, after checking it exited cleanly."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def on_int8_kernels(model):
    """``model`` with every INT8-activation SVDQLinear on the INT8 runner (the GPU's path; its Triton kernels run in
    the interpreter on a CPU machine), without TMA; returns it."""
    from svdquant import SVDQLinear, kernels
    from svdquant.ops.runners import Int8Runner

    for lin in model.modules():
        if isinstance(lin, SVDQLinear) and lin.activations == "int8":
            lin._runner = Int8Runner(lin, kernels, tma=False, num_sms=0)
    return model


def quantized_flux(recipe: str = "int4", iterations: int = 1, input_seed: int = 100):
    """A tiny FLUX quantized on one calibration call, and a call's inputs (that call's, or of ``input_seed``): what the
    compile, optimize and fusion tests run."""
    import svdquant

    torch.manual_seed(0)
    model = build_flux()
    svdquant.quantize(model, svdquant.get_recipe(recipe, iterations=iterations, eval_tokens=64),
                      svdquant.Calibration(inputs=calibration_inputs("flux", model, 1)), progress=False)
    return model, calibration_inputs("flux", model, 1, seed=input_seed)[0]


def on_cuda(model, inputs: dict, dtype: torch.dtype = torch.bfloat16):
    """A copy of ``model`` on the GPU in ``dtype``, and ``inputs`` moved there (the floating ones in ``dtype``, but
    FLUX's position ids, which stay fp32 as diffusers' pipelines pass them)."""
    import copy

    model = copy.deepcopy(model).to("cuda", dtype)
    inputs = {k: v.to("cuda", dtype if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.dtype)
              if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return model, inputs


# --------------------------------------------------------------------------------------
# edit and video pipelines, built offline
# --------------------------------------------------------------------------------------

# FluxKontextPipeline resizes the input image to a preferred (1024-ish) resolution and the output to max_area
# unless told otherwise: 16 x 16 stays 16 x 16 (16 latent tokens and 16 of the input image).
KONTEXT_KWARGS = dict(height=16, width=16, max_area=16 * 16, _auto_resize=False, max_sequence_length=8)


def build_kontext_pipeline(seed: int = 0):
    """A diffusers ``FluxKontextPipeline`` on :func:`build_flux_pipeline`'s tiny components."""
    from diffusers import FluxKontextPipeline

    flux = build_flux_pipeline(seed)
    pipe = FluxKontextPipeline(**{k: v for k, v in flux.components.items() if k in (
        "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def input_image(seed: int = 0, size: int = 16):
    """A fixed-seed random RGB picture (PIL) for the edit pipelines."""
    from PIL import Image

    arr = torch.randint(0, 256, (size, size, 3), generator=_gen(seed), dtype=torch.uint8).numpy()
    return Image.fromarray(arr)


# WanPipeline call: 5 frames of 64 x 64 -> 2 latent frames of 8 x 8 -> 32 tokens; 8 UMT5 tokens (default 512).
WAN_KWARGS = dict(height=64, width=64, num_frames=5, max_sequence_length=8, guidance_scale=5.0)


def build_wan_pipeline(seed: int = 0, two_experts: bool = False):
    """A diffusers ``WanPipeline`` (Wan 2.1 text-to-video) with tiny random components; ``two_experts``: Wan 2.2
    A14B's layout, a second transformer for the low-noise steps (``transformer_2``, ``boundary_ratio``)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        tok = t5_tokenizer()
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tok), d_model=WAN_CONFIG["text_dim"], d_ff=64, d_kv=16, num_layers=1, num_heads=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
            pad_token_id=0, eos_token_id=1))
        vae = AutoencoderKLWan(base_dim=8, z_dim=WAN_CONFIG["in_channels"], dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    extra = dict(transformer_2=build_wan(seed + 2), boundary_ratio=0.5) if two_experts else {}
    pipe = WanPipeline(tokenizer=tok, text_encoder=text_encoder.eval(), vae=vae.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=build_wan(seed), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_video(pipe, prompt: str = "a cat", steps: int = 2, seed: int = 0) -> torch.Tensor:
    """``pipe(prompt)``'s latents (no VAE decode: the tiny Wan VAE is random), fixed noise, tiny sizes."""
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=steps, generator=_gen(seed), output_type="latent",
                    **WAN_KWARGS).frames
