"""FLUX.1 Kontext's Nunchaku checkpoints (``svdq-int4_r32-flux.1-kontext-dev.safetensors``) import as FLUX's do
(svdquant/convert/nunchaku/; issue 26).

Facts from the public nunchaku repository: ``examples/v1/flux.1-kontext-dev.py`` and ``examples/flux.1-kontext-dev.py``
load the Kontext file with the FLUX classes (``NunchakuFluxTransformer2DModelV2`` / ``NunchakuFluxTransformer2dModel``
``.from_pretrained``), whose loaders read one layout and the same metadata (``config``: a diffusers
``FluxTransformer2DModel`` config; ``quantization_config``; ``merge_safetensors.py`` adds ``model_class`` and
``comfy_config``), and hand the model to diffusers' ``FluxKontextPipeline``. Kontext [dev]'s transformer is a FLUX.1
one with guidance embedding, so a tiny FLUX config with ``guidance_embeds=True`` is Kontext's shape; the file
here carries the four metadata keys merge_safetensors writes.
"""

from __future__ import annotations

import json

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
from safetensors.torch import load_file, save_file

import svdquant
from svdquant.modules import SVDQLinear

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

KONTEXT = dict(num_attention_heads=4, guidance_embeds=True)  # 128 wide: Nunchaku's INT4 layers are multiples of 128


def kontext_inputs(model, seed):
    return {**tm.flux_inputs(model, seed=seed), "guidance": torch.full((1,), 2.5)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kontext")
    model = tm.build_flux(dtype=torch.bfloat16, **KONTEXT)
    svdquant.quantize(model, svdquant.get_recipe("w4a4-float", iterations=1, eval_tokens=64),
                      svdquant.Calibration(inputs=[kontext_inputs(model, 100)]), progress=False)
    plain = svdquant.convert.to_nunchaku(model, root / "plain.safetensors")
    # as merge_safetensors writes it: config, comfy_config, model_class, quantization_config
    from safetensors import safe_open

    with safe_open(str(plain), "pt") as f:
        md = dict(f.metadata())
    md["comfy_config"] = json.dumps({"model_class": "Flux", "model_config": {"guidance_embed": True}})
    path = root / "svdq-int4_r32-flux.1-kontext-dev.safetensors"
    save_file(load_file(str(plain)), str(path), metadata=md)
    # the base pipeline: the tiny Kontext pipeline's components around the 16-bit transformer of that config
    from diffusers import FluxKontextPipeline

    flux = tm.build_flux_pipeline()
    parts = {k: v for k, v in flux.components.items() if k in (
        "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    FluxKontextPipeline(transformer=tm.build_flux(**KONTEXT), **parts).save_pretrained(root / "base")
    return model, path, root / "base"


def test_a_kontext_file_imports_as_flux(setup):
    model, path, _ = setup
    meta = svdquant.read_metadata(path)
    assert meta["model_class"] == "FluxTransformer2DModel" and meta["model_config"]["guidance_embeds"] is True
    imported = svdquant.load_quantized(path)
    assert imported.config.guidance_embeds and len(meta["layers"]) == 20  # 12 + 5 W4A4, 3 adaLN per double+single
    x = kontext_inputs(imported, 7)
    y0, y1 = tm.forward(model, x).float(), tm.forward(imported, x).float()
    assert 0 < float((y1 - y0).norm() / y0.norm()) < 0.02  # only the format's two roundings (test_nunchaku.py)


def test_a_kontext_file_loads_into_a_kontext_pipeline(setup):
    from diffusers import FluxKontextPipeline

    model, path, base = setup
    pipe = svdquant.load_pipeline(base, path, torch_dtype=torch.bfloat16)
    assert isinstance(pipe, FluxKontextPipeline)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q, SVDQLinear)
    kw = dict(image=tm.input_image(0), num_inference_steps=2, guidance_scale=2.5, output_type="pt",
              **tm.KONTEXT_KWARGS)
    with torch.no_grad():
        got = pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **kw).images
        pipe.transformer = model  # the model the file was written from
        want = pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert got.shape == (1, 3, 16, 16) and bool(torch.isfinite(got).all())
    assert float((got.float() - want.float()).abs().max()) < 0.05  # measured 0.008; other weights: 0.43
