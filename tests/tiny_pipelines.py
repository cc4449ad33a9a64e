"""Tiny random-weight diffusers pipelines for the newer models, built offline: FLUX.2 [dev] and [klein], Z-Image,
Qwen-Image-Edit (and Edit Plus) and Wan 2.1 image-to-video. Their transformers are :mod:`tiny_models`' tiny ones;
their text encoders are one- or two-layer transformers models from configs, and their tokenizers byte-level BPE
over the 256 byte symbols with no merges (one token a byte) plus the chat markers as special tokens.

``PIPELINES`` maps a name to ``(build, call_kwargs, needs_image)``: ``build(seed=0)`` -> the pipeline;
``call_kwargs`` are what keep its calls tiny (sizes, sequence lengths, which text-encoder layers feed the
transformer), passed to every call as ``Calibration(pipeline_kwargs=)``; ``needs_image``: it edits (animates) an
input image, given as ``image=``.
"""

from __future__ import annotations

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import torch  # noqa: E402

# --------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------

# Qwen's chat format (Qwen2.5 / Qwen3 templates without tools): what Z-Image, FLUX.2 [klein] and Qwen-Image-Edit's
# processor render prompts with.
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

# Mistral Small 3.x's format for a text-only conversation (FLUX.2 [dev] renders [system, user] messages whose
# contents are lists of {"type": "text"} parts).
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set text = m['content'][0]['text'] %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]{% else %}[INST]{{ text }}[/INST]"
    "{% endif %}{% endfor %}"
)

QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>", "<think>", "</think>"]


def _byte_vocab(first: list[str]) -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    return {t: i for i, t in enumerate(first + sorted(ByteLevel.alphabet()))}


def qwen_tokenizer():
    """A ``Qwen2Tokenizer`` (Qwen2.5 / Qwen3's class): byte-level BPE, one token a byte, the chat markers
    special; pads with ``<|endoftext|>`` as Qwen's does."""
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer(vocab=_byte_vocab(["<|endoftext|>"]), merges=[], model_max_length=4096)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def mistral_tokenizer():
    """A Llama-class tokenizer (Mistral's fast tokenizer class) over bytes with Mistral's markers and template."""
    from transformers import LlamaTokenizerFast

    # "\u2581": the Metaspace pre-tokenizer's space
    tok = LlamaTokenizerFast(vocab=_byte_vocab(["<unk>", "<s>", "</s>", "<pad>", "\u2581"]), merges=[],
                             pad_token="<pad>", add_prefix_space=False, model_max_length=4096)
    tok.add_special_tokens({"additional_special_tokens": [
        "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]})
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    return tok


# --------------------------------------------------------------------------------------
# FLUX.2 [dev] and [klein]
# --------------------------------------------------------------------------------------

def _flux2_vae():
    from diffusers import AutoencoderKLFlux2

    # 2 levels: 16 px -> 8 x 8 latents -> 4 x 4 tokens after FLUX.2's 2 x 2 patchify (4 latent channels x 4 = 16)
    return AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=tm.FLUX2_CONFIG["in_channels"] // 4,
        norm_num_groups=8, sample_size=16, use_quant_conv=False, use_post_quant_conv=False).eval()


# The text encoder's hidden states the transformer reads, stacked (the real pipelines take 3 of 30-40 layers):
# 2 of 16 wide = joint_attention_dim 32.
FLUX2_TEXT_LAYERS = (1, 2)
# 48 tokens hold the chat markers, the short system message below and a short prompt (one token a byte)
FLUX2_KWARGS = dict(height=16, width=16, max_sequence_length=48, text_encoder_out_layers=FLUX2_TEXT_LAYERS)


def build_flux2_pipeline(seed: int = 0):
    """A diffusers ``Flux2Pipeline`` (FLUX.2 [dev], guidance-distilled: the transformer embeds the guidance): a
    two-layer Mistral 3 (text model and Pixtral vision tower), a byte tokenizer with Mistral's template in place
    of the Pixtral processor (which needs torchvision; a text-only conversation is rendered by the processor's
    tokenizer alone), a short system message."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        tok = mistral_tokenizer()
        text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config=dict(model_type="mistral", vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                             max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3),
            vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, head_dim=8, image_size=32, patch_size=8),
            image_token_index=len(tok), projector_hidden_act="gelu", spatial_merge_size=1))
        vae = _flux2_vae()
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder.eval(),
                         tokenizer=tok, transformer=tm.build_flux2(seed, guidance_embeds=True))
    pipe.system_message = "Describe the image."  # FLUX.2's is ~90 tokens of Mistral's vocabulary: ~500 bytes
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_flux2_klein_pipeline(seed: int = 0):
    """A diffusers ``Flux2KleinPipeline`` (FLUX.2 [klein]): a two-layer Qwen3, the Qwen byte tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        tok = qwen_tokenizer()
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=256, pad_token_id=tok.pad_token_id))
        vae = _flux2_vae()
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder.eval(),
                              tokenizer=tok, transformer=tm.build_flux2(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------
# Z-Image
# --------------------------------------------------------------------------------------

ZIMAGE_KWARGS = dict(height=32, width=32, max_sequence_length=32)


def build_zimage_pipeline(seed: int = 0):
    """A diffusers ``ZImagePipeline``: a two-layer Qwen3 as its text encoder (it reads the last-but-one hidden
    state, ``cap_feat_dim`` = 32 wide), the Qwen byte tokenizer, a 2-level VAE (32 px -> 16 x 16 latents ->
    8 x 8 tokens of 2 x 2)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen3Config, Qwen3Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        tok = qwen_tokenizer()
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tok), hidden_size=tm.ZIMAGE_CONFIG["cap_feat_dim"], intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            max_position_embeddings=256, pad_token_id=tok.pad_token_id))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
            latent_channels=tm.ZIMAGE_CONFIG["in_channels"], norm_num_groups=8, sample_size=32,
            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(),
                          text_encoder=text_encoder.eval(), tokenizer=tok, transformer=tm.build_zimage(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------
# Qwen-Image-Edit (and Edit Plus)
# --------------------------------------------------------------------------------------

# Qwen2.5-VL's vision side at 4-pixel patches, 2 x 2 merged: the processor shrinks the picture it is shown to
# 16 x 16 pixels (max_pixels), 16 patches, 4 image tokens in the prompt.
QWEN_VL_PATCH, QWEN_VL_MERGE = 4, 2


def qwen_vl_processor():
    """A ``Qwen2VLProcessor`` (what Qwen-Image-Edit's ``processor`` is): the Qwen byte tokenizer and Qwen2-VL's
    image processor (its PIL backend) at the tiny vision tower's patch size; no video processor (it needs
    torchvision, and the pipelines give it no video)."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    side = QWEN_VL_PATCH * QWEN_VL_MERGE * 2
    images = Qwen2VLImageProcessorPil(patch_size=QWEN_VL_PATCH, merge_size=QWEN_VL_MERGE, temporal_patch_size=2,
                                      min_pixels=side * side, max_pixels=side * side)

    class ImageQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without its video processor: transformers builds a processor's parts from its
        ``__init__`` signature, and the video one needs torchvision."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageQwen2VLProcessor(image_processor=images, tokenizer=qwen_tokenizer(),
                                 chat_template=QWEN_CHAT_TEMPLATE)


def qwen_vl_text_encoder(tok, width: int):
    """A one-layer ``Qwen2_5_VLForConditionalGeneration`` ``width`` wide with a one-block vision tower, its
    special token ids those of ``tok``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tok.convert_tokens_to_ids
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}, pad_token_id=tok.pad_token_id,
                         bos_token_id=None, eos_token_id=ids("<|im_end|>")),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=width,
                           patch_size=QWEN_VL_PATCH, spatial_merge_size=QWEN_VL_MERGE, temporal_patch_size=2,
                           window_size=QWEN_VL_PATCH * QWEN_VL_MERGE * 2, fullatt_block_indexes=[0]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))).eval()


def _qwen_vae():
    """Qwen-Image's VAE at 16x (4 levels: ``vae_scale_factor`` is 2 ** len(temperal_downsample)): the edit
    pipelines encode the input picture at ~1024 x 1024 whatever its size (64 x 64 latents, 32 x 32 = 1024
    tokens), so the factor is what keeps the tokens few."""
    from diffusers import AutoencoderKLQwenImage

    z = tm.QWENIMAGE_CONFIG["out_channels"]
    return AutoencoderKLQwenImage(base_dim=2, z_dim=z, dim_mult=[1, 1, 2, 2, 2], num_res_blocks=1,
                                  temperal_downsample=[False] * 4, latents_mean=[0.0] * z,
                                  latents_std=[1.0] * z).eval()


# 64 px out: 4 x 4 latents, 2 x 2 tokens (the input picture adds its 1024); true CFG with a blank negative prompt,
# as Qwen-Image-Edit is run (two transformer calls a step)
QWEN_EDIT_KWARGS = dict(height=64, width=64, negative_prompt=" ", true_cfg_scale=4.0)


def build_qwenimage_edit_pipeline(seed: int = 0, plus: bool = False):
    """A diffusers ``QwenImageEditPipeline`` (``plus``: ``QwenImageEditPlusPipeline``, Qwen-Image-Edit-2509):
    a one-layer Qwen2.5-VL, the Qwen2-VL processor, a 16x VAE, the tiny Qwen-Image transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        processor = qwen_vl_processor()
        text_encoder = qwen_vl_text_encoder(processor.tokenizer, tm.QWENIMAGE_CONFIG["joint_attention_dim"])
        vae = _qwen_vae()
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
               tokenizer=processor.tokenizer, processor=processor, transformer=tm.build_qwenimage(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------
# Wan 2.1 image-to-video
# --------------------------------------------------------------------------------------

# Wan 2.1 I2V's transformer: 36 input channels (16 noise + 4 first-frame mask + 16 first-frame latents) and
# cross-attention to the CLIP image tokens (image_dim: the CLIP vision width; add_k/add_v projections).
WAN_I2V_OVERRIDES = dict(in_channels=36, image_dim=32, added_kv_proj_dim=tm.HIDDEN)
# 512 text tokens, not tm.WAN_KWARGS' 8: Wan's cross-attention takes the image tokens as the context's first
# ``length - 512`` (diffusers' WanAttnProcessor), so shorter text would leave it none.
WAN_I2V_KWARGS = {**tm.WAN_KWARGS, "max_sequence_length": 512}


def build_wan_i2v_pipeline(seed: int = 0):
    """A diffusers ``WanImageToVideoPipeline`` (Wan 2.1 I2V's layout): :func:`tiny_models.build_wan_pipeline`'s
    text encoder and VAE, a two-layer CLIP vision encoder (32 px, 8 px patches: 17 image tokens) with its image
    processor (its PIL backend, as the Qwen one), and the tiny Wan transformer with the image-to-video inputs."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    t2v = tm.build_wan_pipeline(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        image_encoder = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=WAN_I2V_OVERRIDES["image_dim"], intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = WanImageToVideoPipeline(
        tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae, scheduler=t2v.scheduler,
        image_processor=image_processor, image_encoder=image_encoder,
        transformer=tm.build_wan(seed, **WAN_I2V_OVERRIDES))
    pipe.set_progress_bar_config(disable=True)
    return pipe


PIPELINES = {
    "flux2": (build_flux2_pipeline, FLUX2_KWARGS, False),
    "flux2-klein": (build_flux2_klein_pipeline, FLUX2_KWARGS, False),
    "zimage": (build_zimage_pipeline, ZIMAGE_KWARGS, False),
    "qwenimage-edit": (build_qwenimage_edit_pipeline, QWEN_EDIT_KWARGS, True),
    "qwenimage-edit-plus": (lambda seed=0: build_qwenimage_edit_pipeline(seed, plus=True), QWEN_EDIT_KWARGS, True),
    "wan-i2v": (build_wan_i2v_pipeline, WAN_I2V_KWARGS, True),
}
