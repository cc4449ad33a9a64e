"""Peak GPU memory, time per image and weight sizes of whole pipelines, 16-bit vs svdquant (issue 15, part 4).

    python benchmarks/pipeline_memory.py --out $OUT                    # every model below; 1024², 28 steps
    python benchmarks/pipeline_memory.py --models flux --steps 28 --out $OUT
    python benchmarks/pipeline_memory.py --models kontext qwenimage-edit --out $OUT   # the two editing pipelines
    python benchmarks/pipeline_memory.py --quick                        # CPU smoke: tiny configs, seconds

Each pipeline is its diffusers class with the real architecture, built on the GPU with random weights:

* ``flux``: FLUX.1-dev (the transformer of ``benchmarks/quantize_flux.py``'s ``FLUX_DEV``, T5-XXL, CLIP-L, the
  FLUX VAE); guidance 3.5 (distilled: one transformer call per step), T5 512 tokens;
* ``sdxl``: SDXL base (its UNet, CLIP-L and OpenCLIP-bigG, its VAE); CFG 5.0 (batch 2 per step);
* ``qwenimage``: Qwen-Image (its transformer, Qwen2.5-VL-7B, its VAE); true CFG 4.0 with an empty negative
  prompt (two transformer calls per step);
* ``sd3``: Stable Diffusion 3.5 Large (``SD3Transformer2DModel``, 38 blocks of 2432, QK RMSNorm; CLIP-L,
  OpenCLIP-bigG, T5-XXL; the 16-channel VAE with SD3's scale and shift; flow matching, shift 3.0); CFG 3.5
  (batch 2 per step), T5 256 tokens (SD3's default);
* ``sana``: SANA 1600M 1024px (``SanaTransformer2DModel``, 20 linear-attention blocks of 2240; Gemma-2-2B;
  the DC-AE f32c32 autoencoder; flow DPM-Solver, shift 3.0); CFG 4.5 (batch 2 per step), Gemma 300 tokens
  after SANA's default complex-human-instruction preamble (SANA's usual is 20 steps);
* ``pixart``: PixArt-Σ XL 1024 (``PixArtTransformer2DModel``, 28 blocks of 1152; T5-XXL; the SDXL VAE;
  DPM-Solver++); CFG 4.5 (batch 2 per step), T5 300 tokens (PixArt-Σ's usual is 20 steps);
* ``zimage``: Z-Image Turbo (``ZImageTransformer2DModel``; Qwen3-4B; the FLUX VAE); no CFG;
* ``flux2klein``: FLUX.2 [klein] 4B (``Flux2Transformer2DModel``; Qwen3-4B, three hidden states; its VAE); no CFG;
* ``flux2``: FLUX.2 [dev] 32B (``Flux2Pipeline``: ``Flux2Transformer2DModel`` with its constructor defaults, FLUX.2
  [dev]'s config: 8 double and 48 single blocks of 48 heads x 128, 64.45 GB in BF16; Mistral Small 3.1 24B as
  ``Mistral3ForConditionalGeneration``, text and Pixtral vision tower, 48.0 GB, of which the pipeline stacks the
  hidden states after layers 10, 20 and 30: 3 x 5120 = the transformer's joint_attention_dim 15360; FLUX.2's
  VAE); guidance 4.0 (guidance-distilled: one transformer call per step), Mistral 512 tokens. The pipeline is
  112.6 GB in BF16, all of it resident in this script's ``bf16`` variant (not yet run on a GPU);
  ``benchmarks/e2e.py`` encodes the prompt once and drops the text encoder before its variants;
* ``kontext``: FLUX.1 Kontext [dev] (``FluxKontextPipeline``: ``flux``'s transformer, T5-XXL, CLIP-L and VAE; the
  same architecture as FLUX.1-dev), editing a fixed random 1024² RGB picture: the picture's 4096 latent tokens
  join the 4096 being denoised, so every transformer call reads 8192 image tokens (twice FLUX.1-dev's);
  guidance 2.5 (its model card; distilled: one transformer call per step), T5 512 tokens;
* ``qwenimage-edit``: Qwen-Image-Edit (``QwenImageEditPipeline``: ``qwenimage``'s transformer and VAE; Qwen2.5-VL-7B
  with its vision tower run on the picture, through a ``Qwen2VLProcessor`` built offline with Qwen2.5-VL's
  image settings: 14-pixel patches merged 2 x 2, 3136 to 12,845,056 pixels, CLIP's mean and std), editing a
  fixed random 1024² picture: the VAE encodes it at ~1024² whatever its size (4096 more image tokens per
  call, 8192 in all) and Qwen2.5-VL sees it at 1036² (5476 patches, 1369 image tokens in the prompt); true
  CFG 4.0 with a blank negative prompt (two transformer calls per step).

Tokenizers are over single letters, written offline (so T5 still reads its 512 / 256 / 300 padded tokens and
CLIP 77; Qwen-Image's prompt template becomes ~190 letter tokens instead of ~40 real ones; SANA's 166-word
preamble ~890 tokens through Gemma, of which the pipeline keeps the first and the last 299, as with the real
tokenizer; Qwen-Image-Edit's processor uses Qwen's byte-level tokenizer with its chat markers, one token a byte:
after the pipeline drops the template's first 64 tokens the transformer reads 1369 image + 292 text tokens where
the real tokenizer leaves 1369 + ~13, so ~3% more tokens per transformer call: 9853 instead of ~9575; FLUX.2 [dev]'s
Mistral tokenizer is a byte-level one with Mistral's chat markers and template (FLUX.2's system message and the
prompt are 193 byte tokens instead of a few dozen real ones, padded to 512 either way, as the pipeline pads).
Nothing downloads. One image per call at 1024², ``--steps`` steps. Variants,
cumulative, on one pipeline:

* ``bf16``: everything 16-bit on the GPU;
* ``int4``: the transformer (UNet) with svdquant ``int4`` layers where its adapter puts them, random but
  valid contents (codes in [-7, 7], multipliers in [1, 18], as ``benchmarks/flux_step.py`` does: the time
  does not depend on the values; calibrating a 12B model would take minutes);
* ``int4+te4``: + the text encoders quantized by ``svdquant.quantize_text_encoders`` (the real W4A16 g64
  rounding of the random 16-bit weights; the text embedding's relative error is recorded);
* ``int4+te4+offload``: + ``enable_model_cpu_offload()`` (weights on the CPU, one model at a time on the
  GPU), quantized layers in ``--offload-weight-mode`` (memory: 4-bit resident);
* ``int4+te4+offload+fbc``: + First-Block Cache (``enable_cache(FirstBlockCacheConfig(--fbc-threshold))``;
  FLUX, Qwen-Image and Qwen-Image-Edit only: diffusers has no cache hooks for the SDXL UNet, nor for the SD3, SANA,
  PixArt and Z-Image transformers, and on FLUX.2 and FLUX.1 Kontext the cache fails (``FBC_FAILS``), so
  the variant is listed as skipped there, with the reason). With random weights which steps it skips says
  nothing about real models: the number of steps that ran every block is recorded beside the time.

Per variant: peak GPU memory of one measured call (after a 2-step warm-up call that compiles the kernels),
its wall time, what stays resident on the GPU between calls, and the stored weights in GB per component
(the checkpoint's bytes: 4-bit codes + scales + branch for quantized layers). Results are written to
``--out``/pipeline_memory.json after every variant; a variant that would start after ``--budget-s`` is
skipped and listed, so one 7-minute device call always returns what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import string
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantize_flux import FLUX_DEV  # noqa: E402

MODELS = ("flux", "sdxl", "qwenimage", "sd3", "sana", "pixart", "zimage", "flux2klein", "flux2", "kontext",
          "qwenimage-edit")
VARIANTS = ("bf16", "int4", "int4+te4", "int4+te4+offload", "int4+te4+offload+fbc")
# Models whose transformer has diffusers' cache hooks but on which First-Block Cache fails (0.42.1)
FBC_FAILS = {"flux2klein": "a TypeError inside the hook: it subtracts its recorded head-block output, a list, "
                           "from a tensor",
             "flux2": "Flux2Pipeline calls its transformer outside the cache_context the hooks need: "
                      "'ValueError: No cache context is set'",
             "kontext": "FluxKontextPipeline calls its transformer outside the cache_context the hooks need: "
                        "'ValueError: No cache context is set'"}

# ------------------------------------------------------------------------------------------------ configs
# Public configs of the real models (model cards' config.json), and tiny ones with the same layouts for --quick.
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              layer_norm_epsilon=1e-6, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
QWEN25_VL_7B = dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rope_theta=1e6,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31]))
# Qwen2.5-VL-7B-Instruct's image processor (preprocessor_config.json: Qwen2VLImageProcessor; what Qwen-Image-Edit's
# processor/ holds): 14-pixel patches, 2 x 2 merged, 2 frames per temporal patch, 3136 to 12,845,056 pixels.
QWEN25_VL_IMAGES = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136, max_pixels=12845056)
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
SDXL_VAE = dict(FLUX_VAE, latent_channels=4, scaling_factor=0.13025, shift_factor=None, use_quant_conv=True,
                use_post_quant_conv=True)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)
# SD3.5 Large (stabilityai/stable-diffusion-3.5-large transformer/config.json; no dual attention layers:
# those are SD3.5 Medium's MMDiT-X); its VAE is FLUX's layout with SD3's latent scale and shift.
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, dual_attention_layers=(),
                  qk_norm="rms_norm")
SD3_VAE = dict(FLUX_VAE, scaling_factor=1.5305, shift_factor=0.0609)
# SANA 1600M 1024px (Efficient-Large-Model/Sana_1600M_1024px_diffusers; diffusers'
# scripts/convert_sana_to_diffusers.py: SanaMS_1600M_P1_D20 at 1024, flow DPM-Solver with shift 3.0), its text
# encoder the decoder of Gemma-2-2B-it (Gemma2Model), its autoencoder DC-AE f32c32 (mit-han-lab/dc-ae-f32c32-sana-1.0).
SANA_1600M = dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                  num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                  caption_channels=2304, mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1,
                  norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None, qk_norm=None)
GEMMA2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                 max_position_embeddings=8192, query_pre_attn_scalar=256, sliding_window=4096,
                 final_logit_softcapping=30.0, attn_logit_softcapping=50.0, rms_norm_eps=1e-6)
DC_AE_F32C32 = dict(in_channels=3, latent_channels=32, attention_head_dim=32,
                    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
                    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
                    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
                    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                    downsample_block_type="Conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
                    decoder_act_fns="silu", scaling_factor=0.41407)
# PixArt-Σ XL/2 1024 (PixArt-alpha/PixArt-Sigma-XL-2-1024-MS; diffusers' scripts/convert_pixart_sigma_to_diffusers.py:
# positions interpolated 2x at 1024, no micro-conditions); T5-XXL, the SDXL VAE, DPMSolverMultistepScheduler().
PIXART_SIGMA_XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                       cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2,
                       activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                       norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096, interpolation_scale=2,
                       use_additional_conditions=False)
# Qwen3-4B (Qwen/Qwen3-4B config.json): Z-Image's text encoder (it reads the last-but-one hidden state, 2560 wide)
# and FLUX.2 [klein] 4B's (three hidden states stacked: 3 x 2560 = the transformer's joint_attention_dim).
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
# FLUX.2 [klein] 4B (black-forest-labs/FLUX.2-klein-4B): 5 double and 20 single blocks of 24 heads x 128, latents
# of 32 channels patchified 2 x 2 (128), no guidance embedding (step-distilled, 4 steps, no CFG).
FLUX2_KLEIN_4B = dict(num_layers=5, num_single_layers=20, num_attention_heads=24, attention_head_dim=128,
                      in_channels=128, joint_attention_dim=3 * 2560, guidance_embeds=False)
FLUX2_VAE = dict(use_quant_conv=True, use_post_quant_conv=True)  # diffusers' AutoencoderKLFlux2 defaults otherwise
# FLUX.2 [dev] (black-forest-labs/FLUX.2-dev): Flux2Transformer2DModel's constructor defaults are its config, written
# out: 8 double and 48 single blocks of 48 heads x 128 (6144 wide), latents of 32 channels patchified 2 x 2 (128),
# the guidance embedded (guidance-distilled), the text read as three of Mistral's hidden states stacked (3 x 5120).
FLUX2_DEV = dict(num_layers=8, num_single_layers=48, num_attention_heads=48, attention_head_dim=128, in_channels=128,
                 joint_attention_dim=3 * 5120, guidance_embeds=True)
# Flux2Pipeline's text_encoder_out_layers default: hidden_states[10], [20], [30] of Mistral's 40 layers
# (hidden_states[0] is the token embedding)
FLUX2_DEV_TEXT_LAYERS = (10, 20, 30)
# Mistral Small 3.1 24B (FLUX.2-dev's text_encoder/config.json, mistralai/Mistral-Small-3.1-24B-Instruct-2503):
# Mistral3ForConditionalGeneration, a 40-layer Mistral text model and a 24-layer Pixtral vision tower (which a
# text-to-image call never runs: its 0.44 B parameters only take memory). The lm_head is its own matrix in the
# checkpoint (the text config's tie_word_embeddings is false); transformers 5's Mistral3Config defaults the
# top-level flag to true, which would share it with the token embedding (0.67 B parameters, 1.3 GB fewer):
# set false. 24.0 B parameters, 48.0 GB in BF16.
MISTRAL_SMALL_31 = dict(
    text_config=dict(model_type="mistral", vocab_size=131072, hidden_size=5120, intermediate_size=32768,
                     num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=1e9,
                     sliding_window=None, tie_word_embeddings=False),
    vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, head_dim=64, num_channels=3, image_size=1540, patch_size=14,
                       hidden_act="silu", rope_theta=10000.0),
    image_token_index=10, projector_hidden_act="gelu", spatial_merge_size=2, multimodal_projector_bias=False,
    vision_feature_layer=-1, tie_word_embeddings=False)
# Z-Image Turbo (Tongyi-MAI/Z-Image-Turbo): ZImageTransformer2DModel's defaults are its config (30 blocks of 3840,
# 2 refiner blocks per stream, Qwen3-4B's 2560-wide features); the FLUX.1 VAE; 8 steps, no CFG.
FLOW_SHIFT = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                  max_image_seq_len=4096)

TINY = dict(
    flux=dict(num_layers=1, num_single_layers=1, patch_size=1, in_channels=16, out_channels=None,
              num_attention_heads=2, attention_head_dim=32, joint_attention_dim=32, pooled_projection_dim=32,
              guidance_embeds=True, axes_dims_rope=(8, 12, 12)),
    t5=dict(T5_XXL, vocab_size=64, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=1,
            relative_attention_num_buckets=8, relative_attention_max_distance=16),
    clip=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu"),
    vae=dict(FLUX_VAE, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
             block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16),
    unet=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 2),
              transformer_layers_per_block=1, use_linear_projection=True, cross_attention_dim=64,
              addition_embed_type="text_time", addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8),
    qwen_transformer=dict(num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                          in_channels=16, out_channels=4, axes_dims_rope=(8, 12, 12)),
    qwen_vl=dict(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                  rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
                 vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                                    patch_size=2, window_size=8, fullatt_block_indexes=[0])),
    qwen_vae=dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                  latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
    # Qwen-Image-Edit: the byte tokenizer's ~265 ids; the processor shows the vision tower 16 x 16 pixels (8 x 8
    # patches of 2, 16 image tokens); the VAE at 16x, since the pipeline encodes the picture at ~1024² whatever its
    # size (64 x 64 latents, 1024 tokens; qwen_vae's 2x would make 65,536)
    qwen_vl_edit=dict(text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                                       rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
                      vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                                         patch_size=2, window_size=8, fullatt_block_indexes=[0])),
    qwen_vl_images=dict(QWEN25_VL_IMAGES, patch_size=2, min_pixels=16 * 16, max_pixels=16 * 16),
    qwen_edit_vae=dict(base_dim=2, z_dim=4, dim_mult=[1, 1, 2, 2, 2], num_res_blocks=1,
                       temperal_downsample=[False] * 4, latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
    # SD3 pads the two CLIPs' concatenated tokens (2 x 32) to T5's width: its tiny T5 is 64 wide
    sd3=dict(SD35_LARGE, sample_size=8, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=64,
             num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64,
             pos_embed_max_size=8),
    sd3_t5=dict(T5_XXL, vocab_size=64, d_model=64, d_ff=64, d_kv=16, num_heads=2, num_layers=1,
                relative_attention_num_buckets=8, relative_attention_max_distance=16),
    sana=dict(SANA_1600M, in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=2,
              num_cross_attention_heads=2, cross_attention_head_dim=64, cross_attention_dim=128, caption_channels=32,
              sample_size=8),
    gemma2=dict(GEMMA2_2B, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
                query_pre_attn_scalar=16, sliding_window=64),
    dc_ae=dict(DC_AE_F32C32, latent_channels=4, attention_head_dim=8,
               encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
               decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
               encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
               encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
               encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,))),
    pixart=dict(PIXART_SIGMA_XL, num_attention_heads=2, attention_head_dim=64, num_layers=2, cross_attention_dim=128,
                caption_channels=32, sample_size=8, interpolation_scale=1),
    qwen3=dict(QWEN3_4B, vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024),
    # width 192: Z-Image's SwiGLU int(dim / 3 * 8) = 512 is whole groups of 64 (as tests/tiny_models.py)
    zimage=dict(dim=192, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                axes_dims=[32, 32, 32], axes_lens=[256, 64, 64]),
    flux2klein=dict(FLUX2_KLEIN_4B, num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32,
                    in_channels=16, joint_attention_dim=3 * 32, timestep_guidance_channels=32,
                    axes_dims_rope=(8, 8, 8, 8)),
    flux2=dict(FLUX2_DEV, num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32,
               in_channels=16, joint_attention_dim=3 * 32, timestep_guidance_channels=32, axes_dims_rope=(8, 8, 8, 8)),
    # three 32-wide layers, all three stacked (3 x 32 = the tiny transformer's joint_attention_dim); the byte
    # tokenizer's ~270 ids
    mistral3=dict(MISTRAL_SMALL_31,
                  text_config=dict(MISTRAL_SMALL_31["text_config"], vocab_size=300, hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=16, max_position_embeddings=1024),
                  vision_config=dict(MISTRAL_SMALL_31["vision_config"], hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, head_dim=16, image_size=32,
                                     patch_size=8)),
    flux2_vae=dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                   block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                   sample_size=16, use_quant_conv=False, use_post_quant_conv=False),
)


# ------------------------------------------------------------------------------------------------ runs
def run_device(ap: argparse.ArgumentParser, quick: bool) -> str:
    """"cuda", or "cpu" for the ``--quick`` smoke run; a one-line error without a GPU."""
    if not quick and not torch.cuda.is_available():
        ap.error("no CUDA GPU: run on a GPU, or pass --quick for the CPU smoke run")
    return "cpu" if quick else "cuda"


def run_facts(device: str, steps: int, quick: bool) -> dict:
    """What every result file starts with: the device, torch, the steps and the image size."""
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (quick)",
            "torch": torch.__version__, "steps": steps, "size": 16 if quick else 1024}


# ------------------------------------------------------------------------------------------------ tokenizers
def clip_tokenizer(max_length: int = 77):
    """CLIP BPE over single letters, no merges (as tests/tiny_models.py): real padding to 77 tokens."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
    for c in string.ascii_lowercase:
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def qwen_tokenizer():
    """A Qwen2Tokenizer over bytes with Qwen's chat markers and template (as tests/tiny_pipelines.py builds it):
    Z-Image and FLUX.2 [klein] render the prompt through the chat template, one token a byte."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_pipelines import qwen_tokenizer as tiny_qwen_tokenizer

    return tiny_qwen_tokenizer()


def mistral_tokenizer():
    """A Llama-class fast tokenizer over bytes with Mistral's chat markers and template (as tests/tiny_pipelines.py
    builds it): FLUX.2 [dev] renders [system, user] through the template, one token a byte. It stands in for
    FLUX.2-dev's PixtralProcessor, whose tokenizer alone renders a text-only conversation."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_pipelines import mistral_tokenizer as tiny_mistral_tokenizer

    return tiny_mistral_tokenizer()


def qwen_vl_processor(images: dict):
    """A ``Qwen2VLProcessor`` (what Qwen-Image-Edit's ``processor`` is), built offline: :func:`qwen_tokenizer` (its
    ``<|image_pad|>`` marker is what the processor repeats once per merged patch) and Qwen2-VL's image processor
    with ``images``' settings (transformers' torchvision backend where installed, else its PIL one). No video
    processor: the pipeline shows it no video, and transformers' needs torchvision."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    class ImageQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageQwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**images), tokenizer=qwen_tokenizer())


def vision_token_ids(tok) -> dict:
    """Qwen2.5-VL's config entries for the vision markers, as ``tok`` numbers them."""
    ids = tok.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def random_image(width: int, height: int | None = None, seed: int = 0):
    """A fixed random RGB picture (PIL): what the editing and image-to-video pipelines start from."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height or width, width, 3), dtype=np.uint8))


def call_facts(call: dict) -> dict:
    """The call's arguments as the result files record them (a picture by its size)."""
    out = {}
    for k, v in call.items():
        if k == "output_type":
            continue
        out[k] = f"random RGB {v.size[0]}x{v.size[1]} (PIL)" if hasattr(v, "getpixel") else v
    return out


def letter_tokenizer():
    """A Unigram tokenizer over single letters (T5's kind; also stands in for Qwen2.5-VL's)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -1.0) for c in string.ascii_lowercase] + [(c, -2.0) for c in string.ascii_lowercase]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


# ------------------------------------------------------------------------------------------------ pipelines
def _quiet():
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()


def build(model: str, quick: bool, device: str, dtype=torch.bfloat16):
    """(pipeline on ``device`` in ``dtype``, the call's keyword arguments)."""
    import diffusers as D
    import transformers as T

    t = TINY if quick else None
    # schedulers keep their tables on the CPU: made outside the device context
    schedulers = dict(flux=lambda: D.FlowMatchEulerDiscreteScheduler(shift=3.0, **FLOW_SHIFT),
                      kontext=lambda: D.FlowMatchEulerDiscreteScheduler(shift=3.0, **FLOW_SHIFT),
                      **{"qwenimage-edit": lambda: D.FlowMatchEulerDiscreteScheduler(**FLOW_SHIFT)},
                      sdxl=D.EulerDiscreteScheduler, qwenimage=lambda: D.FlowMatchEulerDiscreteScheduler(**FLOW_SHIFT),
                      sd3=lambda: D.FlowMatchEulerDiscreteScheduler(shift=3.0),
                      sana=lambda: D.DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True,
                                                                 prediction_type="flow_prediction"),
                      pixart=D.DPMSolverMultistepScheduler,
                      zimage=lambda: D.FlowMatchEulerDiscreteScheduler(shift=3.0),
                      flux2klein=lambda: D.FlowMatchEulerDiscreteScheduler(shift=3.0, **FLOW_SHIFT),
                      flux2=lambda: D.FlowMatchEulerDiscreteScheduler(shift=3.0, **FLOW_SHIFT))
    if model not in schedulers:
        raise ValueError(f"unknown model {model!r}; choose from {MODELS}")
    scheduler = schedulers[model]()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in 16-bit directly: a 12B model never exists in fp32
    try:
        with torch.device(device):
            torch.manual_seed(0)
            if model in ("flux", "kontext"):  # FLUX.1 Kontext [dev]: FLUX.1-dev's architecture, components
                parts = dict(
                    scheduler=scheduler, vae=D.AutoencoderKL(**(t["vae"] if quick else FLUX_VAE)),
                    text_encoder=T.CLIPTextModel(T.CLIPTextConfig(**(t["clip"] if quick else CLIP_L))),
                    tokenizer=clip_tokenizer(),
                    text_encoder_2=T.T5EncoderModel(T.T5Config(**(t["t5"] if quick else T5_XXL))),
                    tokenizer_2=letter_tokenizer(),
                    transformer=D.FluxTransformer2DModel(**(t["flux"] if quick else dict(
                        num_layers=19, num_single_layers=38, **FLUX_DEV))))
                if model == "flux":
                    pipe = D.FluxPipeline(**parts)
                    kw = dict(guidance_scale=3.5, max_sequence_length=8 if quick else 512)
                else:
                    pipe = D.FluxKontextPipeline(**parts)
                    side = 16 if quick else 1024
                    # 1024² is one of Kontext's preferred resolutions: the picture is encoded at 1024² as given
                    # (the tiny run turns the resizing off: it would pick a preferred ~1024² size)
                    kw = dict(image=random_image(side), guidance_scale=2.5, max_sequence_length=8 if quick else 512,
                              max_area=side * side, **({"_auto_resize": False} if quick else {}))
            elif model == "sdxl":
                pipe = D.StableDiffusionXLPipeline(
                    vae=D.AutoencoderKL(**(t["vae"] if quick else SDXL_VAE)),
                    text_encoder=T.CLIPTextModel(T.CLIPTextConfig(**(t["clip"] if quick else CLIP_L))),
                    text_encoder_2=T.CLIPTextModelWithProjection(T.CLIPTextConfig(**(t["clip"] if quick
                                                                                    else CLIP_BIG_G))),
                    tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(),
                    unet=D.UNet2DConditionModel(**(t["unet"] if quick else SDXL_UNET)),
                    scheduler=scheduler, add_watermarker=False)
                kw = dict(guidance_scale=5.0)
            elif model == "qwenimage":
                pipe = D.QwenImagePipeline(
                    scheduler=scheduler, vae=D.AutoencoderKLQwenImage(**(t["qwen_vae"] if quick else {})),
                    text_encoder=T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(
                        **(t["qwen_vl"] if quick else QWEN25_VL_7B))),
                    tokenizer=letter_tokenizer(),
                    transformer=D.QwenImageTransformer2DModel(**(t["qwen_transformer"] if quick else {})))
                kw = dict(true_cfg_scale=4.0, negative_prompt=" ")
            elif model == "qwenimage-edit":
                processor = qwen_vl_processor(t["qwen_vl_images"] if quick else QWEN25_VL_IMAGES)
                vl = t["qwen_vl_edit"] if quick else QWEN25_VL_7B
                pipe = D.QwenImageEditPipeline(
                    scheduler=scheduler,
                    vae=D.AutoencoderKLQwenImage(**(t["qwen_edit_vae"] if quick else {})),
                    text_encoder=T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(
                        **vl, **vision_token_ids(processor.tokenizer))),
                    tokenizer=processor.tokenizer, processor=processor,
                    transformer=D.QwenImageTransformer2DModel(**(t["qwen_transformer"] if quick else {})))
                # the pipeline sizes its VAE input (and, by default, its output) to ~1024² from the picture
                kw = dict(image=random_image(16 if quick else 1024), true_cfg_scale=4.0, negative_prompt=" ")
            elif model == "sd3":
                pipe = D.StableDiffusion3Pipeline(
                    scheduler=scheduler, vae=D.AutoencoderKL(**(t["vae"] if quick else SD3_VAE)),
                    text_encoder=T.CLIPTextModelWithProjection(T.CLIPTextConfig(**(t["clip"] if quick else CLIP_L))),
                    text_encoder_2=T.CLIPTextModelWithProjection(T.CLIPTextConfig(**(t["clip"] if quick
                                                                                    else CLIP_BIG_G))),
                    text_encoder_3=T.T5EncoderModel(T.T5Config(**(t["sd3_t5"] if quick else T5_XXL))),
                    tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), tokenizer_3=letter_tokenizer(),
                    transformer=D.SD3Transformer2DModel(**(t["sd3"] if quick else SD35_LARGE)))
                kw = dict(guidance_scale=3.5, max_sequence_length=8 if quick else 256)
            elif model == "sana":
                pipe = D.SanaPipeline(
                    scheduler=scheduler, vae=D.AutoencoderDC(**(t["dc_ae"] if quick else DC_AE_F32C32)),
                    text_encoder=T.Gemma2Model(T.Gemma2Config(**(t["gemma2"] if quick else GEMMA2_2B))),
                    tokenizer=letter_tokenizer(),  # the pipeline pads on the right itself, as Gemma's needs
                    transformer=D.SanaTransformer2DModel(**(t["sana"] if quick else SANA_1600M)))
                kw = dict(guidance_scale=4.5, max_sequence_length=8 if quick else 300)
            elif model == "pixart":
                pipe = D.PixArtSigmaPipeline(
                    scheduler=scheduler, vae=D.AutoencoderKL(**(t["vae"] if quick else SDXL_VAE)),
                    text_encoder=T.T5EncoderModel(T.T5Config(**(t["t5"] if quick else T5_XXL))),
                    tokenizer=letter_tokenizer(),
                    transformer=D.PixArtTransformer2DModel(**(t["pixart"] if quick else PIXART_SIGMA_XL)))
                # clean_caption needs bs4 + ftfy and only rewrites the prompt's text: off, as SANA's default
                kw = dict(guidance_scale=4.5, max_sequence_length=8 if quick else 300, clean_caption=False)
            elif model == "zimage":
                pipe = D.ZImagePipeline(
                    scheduler=scheduler, vae=D.AutoencoderKL(**(dict(t["vae"], latent_channels=16) if quick
                                                                else dict(FLUX_VAE, use_quant_conv=False))),
                    text_encoder=T.Qwen3Model(T.Qwen3Config(**(t["qwen3"] if quick else QWEN3_4B))),
                    tokenizer=qwen_tokenizer(),
                    transformer=D.ZImageTransformer2DModel(**(t["zimage"] if quick else {})))
                kw = dict(guidance_scale=0.0, max_sequence_length=32 if quick else 512)  # Turbo: no CFG
            elif model == "flux2klein":
                pipe = D.Flux2KleinPipeline(
                    scheduler=scheduler, vae=D.AutoencoderKLFlux2(**(t["flux2_vae"] if quick else FLUX2_VAE)),
                    text_encoder=T.Qwen3ForCausalLM(T.Qwen3Config(**(t["qwen3"] if quick else QWEN3_4B))),
                    tokenizer=qwen_tokenizer(), is_distilled=True,
                    transformer=D.Flux2Transformer2DModel(**(t["flux2klein"] if quick else FLUX2_KLEIN_4B)))
                kw = dict(guidance_scale=1.0, max_sequence_length=48 if quick else 512,
                          text_encoder_out_layers=(1, 2, 3) if quick else (9, 18, 27))
            elif model == "flux2":  # FLUX.2 [dev]: every component built on the device, none twice in memory
                pipe = D.Flux2Pipeline(
                    scheduler=scheduler, vae=D.AutoencoderKLFlux2(**(t["flux2_vae"] if quick else FLUX2_VAE)),
                    text_encoder=T.Mistral3ForConditionalGeneration(T.Mistral3Config(
                        **(t["mistral3"] if quick else MISTRAL_SMALL_31))),
                    tokenizer=mistral_tokenizer(),
                    transformer=D.Flux2Transformer2DModel(**(t["flux2"] if quick else FLUX2_DEV)))
                # guidance 4.0: Flux2Pipeline's default (embedded by the transformer: one call per step whatever its
                # value); the template, the system message and the prompt are 193 byte tokens: the quick run's 256
                # hold them too
                kw = dict(guidance_scale=4.0, max_sequence_length=256 if quick else 512,
                          text_encoder_out_layers=(1, 2, 3) if quick else FLUX2_DEV_TEXT_LAYERS)
    finally:
        torch.set_default_dtype(prev)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()  # transformers builds in training mode (dropout)
    pipe.set_progress_bar_config(disable=True)
    size = 1024
    if quick:
        size = 32 if model in ("sana", "zimage") else 16  # SANA's and Z-Image's pipelines take multiples of 32
        if model == "qwenimage-edit":
            size = 64  # multiples of 32 (its tiny VAE is 16x, x 2 packing): 2 x 2 tokens beside the picture's 1024
        if model in ("sana", "pixart"):
            kw["use_resolution_binning"] = False  # bins by sample_size: none for the tiny ones
    return pipe, dict(prompt="a red fox in the snow", height=size, width=size, output_type="pt", **kw)


def denoiser(pipe) -> torch.nn.Module:
    model = getattr(pipe, "transformer", None)
    return model if model is not None else pipe.unet


# ------------------------------------------------------------------------------------------------ random int4
def layer_formats(weight_only: bool, weight_format: str | None = None, rank: int = 32) -> dict:
    """What an ``int4``-recipe layer of a group is built with: the recipe's own formats, or a weight-only group's
    (svdquant's rule for them, :func:`svdquant.quantize.blocks.weight_only`, ``weight_format`` its override)."""
    import svdquant
    from svdquant.quantize.blocks import weight_only as weight_only_recipe

    if not weight_only:
        return dict(rank=rank)
    rc = weight_only_recipe(svdquant.get_recipe("int4"), weight_format)
    return dict(weights=rc.weights, activations=None, rank=0, group_size=rc.group_size)


def random_svdq(old: torch.nn.Module, weight_only: bool, gen: torch.Generator, rank: int = 32,
                weight_format: str | None = None, down: torch.Tensor | None = None):
    """An ``int4``-recipe SVDQLinear for ``old`` (a linear or 1x1 conv) with random valid contents, scaled so
    outputs keep the size of a default-initialized layer (finite activations through 60 blocks); a weight-only
    group with its ``weight_format`` (Z-Image's INT8 adaLN). ``down``: its branch's down projection (another
    member's of its shared-branch group), else drawn too."""
    from svdquant.formats import pack_4bit_halves
    from svdquant.modules import SVDQConv1x1, SVDQLinear

    conv = isinstance(old, torch.nn.Conv2d)
    k, n = (old.in_channels, old.out_channels) if conv else (old.in_features, old.out_features)
    dev, dt = old.weight.device, old.weight.dtype
    m = SVDQLinear(k, n, old.bias is not None, dtype=dt, device=dev, **layer_formats(weight_only, weight_format, rank))
    std = 0.577 / k**0.5  # nn.Linear's default init: U(±1/√K)
    if m.weights == "int8":  # per-row scales, unpacked codes (uniform in ±127: std ~73)
        with torch.no_grad():
            m.qweight.copy_(torch.randint(-127, 128, m.qweight.shape, device=dev, generator=gen, dtype=torch.int8))
            m.wscales.fill_(std / 73.0)
            if m.bias is not None:
                m.bias.copy_(old.bias)
        m.refresh()
        return SVDQConv1x1(m) if conv else m
    kp = k + (-k) % m.group_size
    codes = torch.randint(-7, 8, (n, kp), device=dev, generator=gen, dtype=torch.int8)
    with torch.no_grad():
        m.qweight.copy_(pack_4bit_halves(codes, m.group_size))
        if weight_only:
            m.wscales.copy_(torch.full(m.wscales.shape, std / 4.3, device=dev))  # codes' std is ~4.3
        else:
            m.wmult.copy_(torch.randint(1, 19, m.wmult.shape, device=dev, generator=gen, dtype=torch.uint8))
            m.wscales.fill_(std / (4.3 * 10.5))  # × a multiplier of 10.5 on average
            m.smooth_inv.fill_(1.0)
            m.lora_down.copy_(torch.randn(m.lora_down.shape, device=dev, generator=gen) / k**0.5 if down is None
                              else down)
            m.lora_up.copy_(torch.randn(m.lora_up.shape, device=dev, generator=gen) * 0.01)
        if m.bias is not None:
            m.bias.copy_(old.bias)
    m.refresh()  # random_quantize's set_weight_mode prepares it again in the mode asked for
    return SVDQConv1x1(m) if conv else m


def _groups_by_root(adapter, model):
    """(module, its groups) for each block (or the model without stacks), then the model and the adapter's groups
    outside the blocks (FLUX.2's modulation and embedders), as ``svdquant.quantize`` walks them."""
    roots = adapter.blocks(model) if adapter.stacks else [("", model)]
    return [(root, adapter.groups(root)) for _, root in roots] + [(model, list(adapter.model_groups))]


def random_quantize(model: torch.nn.Module, mode: str) -> int:
    """Replace every layer svdquant's adapter quantizes by :func:`random_svdq`; returns how many. The members of a
    shared-branch group (q/k/v) share one down projection, as a quantized checkpoint's do, so their stacked GEMM's
    branch keeps rank 32 (before session 22 it was block-diagonal, rank 96 padded to 128: a slower activation pass,
    and Triton's GEMM where an H100 / H200 runs the CUTLASS one)."""
    import svdquant
    from svdquant.models import get_adapter
    from svdquant.models.base import present

    adapter = get_adapter(model)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    n = 0
    for root, groups in _groups_by_root(adapter, model):
        for g in groups:
            down = None
            for name in present(root, *g.names):
                parent, _, child = name.rpartition(".")
                owner = root.get_submodule(parent) if parent else root
                new = random_svdq(getattr(owner, child), g.weight_only, gen, weight_format=g.weight_format,
                                  down=down)
                if g.shared_branch and not g.weight_only and down is None:  # the group's one branch
                    down = (new if hasattr(new, "lora_down") else new.linear).lora_down  # a 1x1 conv wraps its linear
                setattr(owner, child, new)
                n += 1
    svdquant.set_weight_mode(model, mode)
    return n


# ------------------------------------------------------------------------------------------------ measuring
def stored_bytes(module: torch.nn.Module) -> int:
    """What a checkpoint of ``module`` holds: every parameter and buffer, a quantized layer's packed 4-bit
    codes counted as stored even where speed mode keeps INT8 copies instead."""
    from svdquant.formats import get_format
    from svdquant.modules import SVDQLinear

    total, seen = 0, set()
    for m in module.modules():
        if isinstance(m, SVDQLinear):
            layout = get_format(m.weights).weight_buffers(m.out_features, m.in_features, m.group_size, m.dtype)
            for shape, dt in layout.values():
                total += torch.Size(shape).numel() * torch.empty(0, dtype=dt).element_size()
            for name, b in m._buffers.items():
                if b is not None and name not in layout:
                    total += b.numel() * b.element_size()
            seen.update(id(b) for b in m._buffers.values() if b is not None)
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def components_gb(pipe) -> dict[str, float]:
    return {name: round(stored_bytes(m) / 1e9, 6) for name, m in pipe.components.items()
            if isinstance(m, torch.nn.Module)}


class Runs:
    """Counts the denoiser's calls and those on which its last block ran (First-Block Cache skips the rest)."""

    def __init__(self, model):
        from svdquant.models import get_adapter

        self.calls = self.full = 0
        model.register_forward_pre_hook(self._call)
        last = get_adapter(model).blocks(model)[-1][1]
        # a leaf inside the block: the block's own pre-hooks fire even when the cache skips its forward
        inner = next(m for m in last.modules() if m is not last and not list(m.children()))
        inner.register_forward_pre_hook(self._full)

    def _call(self, *_):
        self.calls += 1

    def _full(self, *_):
        self.full += 1


def measure(pipe, call: dict, steps: int, device: str, runs: Runs | None = None) -> dict:
    cuda = device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    gen = torch.Generator("cpu")
    with torch.no_grad():
        pipe(**call, num_inference_steps=2, generator=gen.manual_seed(0))  # compiles the kernels, first moves
        sync()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() / 1e9 if cuda else None
        if runs is not None:
            runs.calls = runs.full = 0
        t0 = time.perf_counter()
        out = pipe(**call, num_inference_steps=steps, generator=gen.manual_seed(0)).images
        sync()
        seconds = time.perf_counter() - t0
    res = dict(seconds_per_image=round(seconds, 3), resident_gb=resident and round(resident, 3),
               peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None,
               finite=bool(torch.isfinite(out).all()), shape=list(out.shape))
    if runs is not None:
        res["denoiser_calls"], res["calls_all_blocks_ran"] = runs.calls, runs.full
    return res


def text_embedding(pipe, call: dict) -> list[torch.Tensor]:
    """What the denoiser reads from the encoders: FLUX [T5 tokens, CLIP pooled]; SDXL [both CLIPs' penultimate
    hidden states, concatenated; bigG pooled]; Qwen-Image [Qwen2.5-VL's last hidden states]; SD3 [CLIP-L and
    bigG penultimate states, concatenated, padded and joined to T5's tokens; both CLIPs' pooled]; SANA [Gemma's
    last hidden states, after the complex-human-instruction preamble the call puts before the prompt];
    PixArt-Σ [T5 tokens]; Z-Image [Qwen3's last-but-one hidden states]; FLUX.2 [klein] [three of Qwen3's hidden
    states, stacked]; FLUX.2 [dev] [three of Mistral's hidden states, stacked]; FLUX.1 Kontext as FLUX;
    Qwen-Image-Edit [Qwen2.5-VL's last hidden states over the prompt and the picture's image tokens]."""
    import inspect

    kind = type(pipe).__name__
    prompt = call["prompt"]
    with torch.no_grad():
        if kind == "StableDiffusionXLPipeline":
            out = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
            return [out[0], out[2]]
        if kind == "StableDiffusion3Pipeline":
            out = pipe.encode_prompt(prompt, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
                                     max_sequence_length=call["max_sequence_length"])
            return [out[0], out[2]]
        if kind in ("FluxPipeline", "FluxKontextPipeline"):  # Kontext's prompt does not see the picture
            return list(pipe.encode_prompt(prompt, prompt_2=None,
                                           max_sequence_length=call["max_sequence_length"])[:2])
        if kind == "SanaPipeline":
            chi = inspect.signature(pipe.__call__).parameters["complex_human_instruction"].default
            return [pipe.encode_prompt(prompt, do_classifier_free_guidance=False, complex_human_instruction=chi,
                                       max_sequence_length=call["max_sequence_length"])[0]]
        if kind == "PixArtSigmaPipeline":
            return [pipe.encode_prompt(prompt, do_classifier_free_guidance=False, clean_caption=False,
                                       max_sequence_length=call["max_sequence_length"])[0]]
        if kind == "ZImagePipeline":  # one tensor per prompt, its own length
            return list(pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                           max_sequence_length=call["max_sequence_length"])[0])
        if kind in ("Flux2KleinPipeline", "Flux2Pipeline"):
            return [pipe.encode_prompt(prompt, max_sequence_length=call["max_sequence_length"],
                                       text_encoder_out_layers=call["text_encoder_out_layers"])[0]]
        if kind == "QwenImageEditPipeline":  # Qwen2.5-VL reads the picture too, resized as the call resizes it
            from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

            image = call["image"]
            w, h, _ = calculate_dimensions(1024 * 1024, image.size[0] / image.size[1])
            return [pipe.encode_prompt(prompt, image=pipe.image_processor.resize(image, h, w))[0]]
        return [pipe.encode_prompt(prompt)[0]]


def run_model(model: str, args, device: str, log, results: dict, t_start: float) -> None:
    import svdquant

    res = results.setdefault(model, {})

    def budget_left() -> bool:
        return time.perf_counter() - t_start < args.budget_s

    if not budget_left():
        res["skipped"] = f"past --budget-s {args.budget_s}"
        return
    t = time.perf_counter()
    pipe, call = build(model, args.quick, device)
    pipe.to(device)
    res["build_s"] = round(time.perf_counter() - t, 1)
    res["call"] = call_facts(call) | {"steps": args.steps}
    den = denoiser(pipe)
    for variant in VARIANTS:
        if variant.endswith("fbc") and not hasattr(den, "enable_cache"):
            res[variant] = {"skipped": f"{type(den).__name__} has no First-Block Cache in diffusers"}
            continue
        if variant.endswith("fbc") and model in FBC_FAILS:
            res[variant] = {"skipped": f"diffusers' First-Block Cache fails on {type(den).__name__} ({FBC_FAILS[model]})"}
            continue
        if not budget_left():
            res[variant] = {"skipped": f"past --budget-s {args.budget_s}"}
            continue
        runs = None
        if variant == "int4":
            res["quantized_layers"] = random_quantize(den, args.weight_mode)
        elif variant == "int4+te4":
            before = text_embedding(pipe, call)
            report = svdquant.quantize_text_encoders(pipe, progress=False)
            after = text_embedding(pipe, call)
            res["text_embedding_rel_error"] = [round(float((a.float() - b.float()).norm() / b.float().norm()), 4)
                                               for a, b in zip(after, before)]
            res["text_encoder_weight_error_median"] = {
                name: round(statistics.median(r.rel_error for r in report.text_encoder_rows
                                              if r.names[0].startswith(name + ".")), 4)
                for name in report.text_encoders}
        elif variant == "int4+te4+offload":
            for m in pipe.components.values():
                if isinstance(m, torch.nn.Module):
                    svdquant.set_weight_mode(m, args.offload_weight_mode)
            pipe.enable_model_cpu_offload(**({"device": "cpu"} if device == "cpu" else {}))
        elif variant.endswith("fbc"):
            from diffusers.hooks import FirstBlockCacheConfig

            den.enable_cache(FirstBlockCacheConfig(threshold=args.fbc_threshold))
            runs = Runs(den)
        t = time.perf_counter()
        r = measure(pipe, call, args.steps, device, runs)
        r["weights_gb"] = components_gb(pipe)
        r["weight_mode"] = None if variant == "bf16" else (
            args.offload_weight_mode if "offload" in variant else args.weight_mode)
        r["wall_s"] = round(time.perf_counter() - t, 1)
        res[variant] = r
        log(f"{model:10s} {variant:22s} {json.dumps(r)}")
        args.save(results)
    del pipe, den
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def empty_quantize(pipe) -> None:
    """Swap in empty quantized layers on the meta device, where the real ones would go: the denoiser's as
    its adapter says (``int4`` layouts), the text encoders' as ``quantize_text_encoders`` does (W4A16 g64).
    Sizes only: nothing is computed."""
    from svdquant.models import get_adapter
    from svdquant.models.base import present
    from svdquant.models.text_encoders import encoder_layers, text_encoders
    from svdquant.modules import SVDQConv1x1, SVDQLinear

    def swap(owner, child, weight_only, weight_format=None):
        old = getattr(owner, child)
        conv = isinstance(old, torch.nn.Conv2d)
        k, n = (old.in_channels, old.out_channels) if conv else (old.in_features, old.out_features)
        new = SVDQLinear(k, n, old.bias is not None, dtype=old.weight.dtype, device="meta",
                         **layer_formats(weight_only, weight_format))
        setattr(owner, child, SVDQConv1x1(new) if conv else new)

    den = denoiser(pipe)
    adapter = get_adapter(den)
    for root, groups in _groups_by_root(adapter, den):
        for g in groups:
            for name in present(root, *g.names):
                parent, _, child = name.rpartition(".")
                swap(root.get_submodule(parent) if parent else root, child, g.weight_only, g.weight_format)
    for te in text_encoders(pipe).values():
        for name in encoder_layers(te):
            parent, _, child = name.rpartition(".")
            swap(te.get_submodule(parent), child, True)


def sizes(models) -> dict:
    """Stored weights in GB per component, 16-bit and quantized, from the real configs built on meta (seconds,
    no GPU): the ``weights_gb`` a GPU run reports, computed."""
    out = {}
    for model in models:
        pipe, _ = build(model, False, "meta")
        out[model] = {"bf16": components_gb(pipe)}
        empty_quantize(pipe)
        out[model]["int4+te4"] = components_gb(pipe)
    return out


def _num(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(results: dict) -> str:
    lines = ["| model | variant | peak GPU (GB) | resident (GB) | s / image | weights (GB) | note |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for model, res in results.items():
        if not isinstance(res, dict) or "skipped" in res and len(res) == 1:
            lines.append(f"| {model} | - | | | | | {res.get('skipped') if isinstance(res, dict) else res} |")
            continue
        for v in VARIANTS:
            r = res.get(v)
            if r is None:
                continue
            if "skipped" in r:
                lines.append(f"| {model} | {v} | | | | | {r['skipped']} |")
                continue
            w = " + ".join(f"{k} {g:.2f}" for k, g in r["weights_gb"].items())
            note = [f"{r['weight_mode']} mode"] if r["weight_mode"] else []
            if "calls_all_blocks_ran" in r:
                note.append(f"all blocks ran on {r['calls_all_blocks_ran']} of {r['denoiser_calls']} denoiser calls")
            if not r["finite"]:
                note.append("non-finite output")
            lines.append(f"| {model} | {v} | {_num(r['peak_gb'])} | {_num(r['resident_gb'])} | "
                         f"{r['seconds_per_image']} | {w} | {', '.join(note)} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--weight-mode", choices=("speed", "memory"), default="speed",
                    help="int4 layers while the pipeline stays on the GPU (default speed: INT8 resident)")
    ap.add_argument("--offload-weight-mode", choices=("speed", "memory"), default="memory",
                    help="int4 layers under model offload (default memory: 4-bit resident)")
    ap.add_argument("--fbc-threshold", type=float, default=0.05,
                    help="First-Block Cache threshold (default 0.05: diffusers' default)")
    ap.add_argument("--budget-s", type=float, default=360.0, help="start no variant after this many seconds")
    ap.add_argument("--quick", action="store_true",
                    help="CPU, tiny configs, 16x16 (SANA, Z-Image 32x32; Qwen-Image-Edit 64x64), 2 steps: checks the "
                         "script runs")
    ap.add_argument("--sizes", action="store_true",
                    help="only the stored weights per component, 16-bit and quantized, computed on meta (no GPU)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: must be at least 1")
    if args.sizes:
        _quiet()
        res = sizes(args.models)
        for model, r in res.items():
            for variant, gb in r.items():
                print(f"{model:10s} {variant:9s} " + "  ".join(f"{k} {v:.3f}" for k, v in gb.items())
                      + f"  total {sum(gb.values()):.3f} GB")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "pipeline_sizes.json").write_text(json.dumps(res, indent=1))
        return res
    if args.quick:
        args.steps = min(args.steps, 2)
    device = run_device(ap, args.quick)
    _quiet()
    import svdquant  # noqa: F401  (registers nothing this needs; fails early if the tree is broken)

    t_start = time.perf_counter()
    results = run_facts(device, args.steps, args.quick)
    import diffusers
    import transformers

    results["diffusers"], results["transformers"] = diffusers.__version__, transformers.__version__

    def save(r):
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "pipeline_memory.json").write_text(json.dumps(r, indent=1))

    args.save = save
    for model in args.models:
        run_model(model, args, device, lambda s: print(s, flush=True), results, t_start)
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    save(results)
    print(table({k: v for k, v in results.items() if k in MODELS}))
    return results


if __name__ == "__main__":
    main()
