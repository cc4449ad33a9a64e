"""Adapters for the diffusers transformers (and SDXL's UNet) SVDQuant targets (DESIGN.md §1, §6).

Kept 16-bit everywhere: embedders (patch/x/context/time/text/caption), the final norm
and projection, q/k RMSNorms and attention math (they are not in any group). The embedders
and the final projection read or write the latents and the text encoder's features
directly, run once per call on few channels, and hold a tiny share of the weights: 4 bits
there would cost quality for no speed or memory worth having.
"""

from __future__ import annotations

import torch.nn as nn

from .base import Adapter, Group, groups_of

SHARED = {}  # default Group kwargs: one λ and one shared branch


def _flux_groups(block: nn.Module):
    if hasattr(block, "proj_mlp"):  # FluxSingleTransformerBlock
        dim = block.proj_mlp.in_features
        return groups_of(
            block,
            # q/k/v and the MLP up projection read the same normed input: one λ, one branch
            # (the engine runs them as one 3072 -> 21504 GEMM).
            (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), SHARED),
            # proj_out reads [attention (dim) | GELU(mlp)]: only the GELU part is shifted/unsigned.
            (("proj_out",), dict(post_gelu=dim)),
            (("norm.linear",), dict(weight_only=True)),
        )
    return groups_of(block, *_JOINT_ATTENTION, *_JOINT_MLP_AND_ADALN)  # FluxTransformerBlock


# FLUX double blocks and SD3 joint blocks share their layout: image and text streams, each
# with its own projections, MLP and adaLN modulation.
_JOINT_ATTENTION = (
    (("attn.to_q", "attn.to_k", "attn.to_v"), SHARED),
    (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), SHARED),
    # to_out and to_add_out read different tokens of the attention output; each gets
    # its own λ (the output error can only go down against a shared one).
    (("attn.to_out.0",), SHARED),
    (("attn.to_add_out",), SHARED),
)
_JOINT_MLP_AND_ADALN = (
    (("ff.net.0.proj",), SHARED),
    (("ff.net.2",), dict(post_gelu=True)),
    (("ff_context.net.0.proj",), SHARED),
    (("ff_context.net.2",), dict(post_gelu=True)),
    (("norm1.linear",), dict(weight_only=True)),
    (("norm1_context.linear",), dict(weight_only=True)),
)


# FLUX.2's adaLN modulation is not in the blocks: three ``Flux2Modulation`` linears on the model make every block's
# shift/scale/gate once per call from the timestep embedding (3.7 % of FLUX.2 [klein] 4B's weights, ~2 % of
# [dev]'s). They, the text (context) embedder and the final adaLN are INT8 weight-only with per-channel scales,
# which takes [klein] past 3.5x smaller: on the tiny FLUX.2 (three seeds) the output error moved +3 to +6 %
# (BENCHMARKS.md, "The new models end to end"), where W4A16 on the modulation alone made it 1.6x. The timestep
# embedder (+4-5 % each of its two linears, 0.3 % of the weights), the image patch embedder and the output
# projection (INT8 there: 5x the error, 0.02 % of the weights) stay 16-bit.
_FLUX2_MODEL_GROUPS = (
    Group(("double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
           "single_stream_modulation.linear", "context_embedder", "norm_out.linear"),
          weight_only=True, weight_format="int8"),
)


def _flux2_groups(block: nn.Module):
    """FLUX.2 (``Flux2Transformer2DModel``, FLUX.2 [dev] and [klein]): FLUX.1's double / single layout with
    SwiGLU feed-forwards and no biases; its modulation and embedders are on the model (``_FLUX2_MODEL_GROUPS``)."""
    if hasattr(block.attn, "to_qkv_mlp_proj"):  # Flux2SingleTransformerBlock
        return groups_of(
            block,
            # one linear already: q/k/v and the SwiGLU gate/up read the same normed, modulated tokens
            (("attn.to_qkv_mlp_proj",), SHARED),
            # to_out reads [attention | SiLU(gate)·up]: signed on both sides (SwiGLU is not GELU), no shift
            (("attn.to_out",), SHARED),
        )
    return groups_of(
        block,
        *_JOINT_ATTENTION,
        # Flux2FeedForward: linear_in makes [gate | up]; linear_out reads SiLU(gate)·up, which is signed
        (("ff.linear_in",), SHARED),
        (("ff.linear_out",), SHARED),
        (("ff_context.linear_in",), SHARED),
        (("ff_context.linear_out",), SHARED),
    )


def _zimage_groups(block: nn.Module):
    """Z-Image (``ZImageTransformerBlock``: the noise and context refiners and the main layers, one kind of
    block). Single-stream: image and caption tokens run through the same linears."""
    return groups_of(
        block,
        (("attention.to_q", "attention.to_k", "attention.to_v"), SHARED),
        (("attention.to_out.0",), SHARED),
        # SwiGLU feed-forward: w1 (gate) and w3 (up) read the same normed tokens; w2 reads SiLU(w1 x)·w3 x,
        # signed, so it is not shifted as a post-GELU input is
        (("feed_forward.w1", "feed_forward.w3"), SHARED),
        (("feed_forward.w2",), SHARED),
        # adaLN_modulation = Sequential(Linear(min(dim, 256), 4·dim)): INT8 weight-only (per-channel scales), not
        # the recipe's 4 bits. Unlike FLUX's norm1.linear (dim -> 6·dim, 9% of FLUX.1's weights) it reads the
        # 256-wide timestep embedding, 2% of Z-Image's weights, and its tanh gates and scales multiply every token:
        # 4 bits there cost ~1 dB on the tiny Z-Image, 8 bits nothing measurable, and keep the transformer 3.5x+
        # smaller than 16-bit (BENCHMARKS.md, "The new models end to end").
        (("adaLN_modulation.0",), dict(weight_only=True, weight_format="int8")),
    )


def _wan_groups(block: nn.Module):
    """Wan 2.1 / 2.2 (``WanTransformerBlock``): self-attention, cross-attention to the text (and, for image to
    video 2.1, to the CLIP image tokens), GELU feed-forward. No modulation linear in the block: a learned
    ``scale_shift_table`` plus the model's one ``condition_embedder.time_proj`` (16-bit with the embedders,
    about 1% of Wan 2.1 14B's weights)."""
    return groups_of(
        block,
        (("attn1.to_q", "attn1.to_k", "attn1.to_v"), SHARED),
        (("attn1.to_out.0",), SHARED),
        (("attn2.to_q",), SHARED),
        # cross-attention K/V read the 512 text tokens (add_k/add_v the 257 image tokens), not the ~32k video
        # tokens of a 480p clip: their GEMMs cost little, their weights do not (2 x dim² per block, 15% of
        # the 14B model). Weight-only keeps the text activations 16-bit and still stores them in 4 bits.
        (("attn2.to_k", "attn2.to_v"), dict(weight_only=True)),
        (("attn2.add_k_proj", "attn2.add_v_proj"), dict(weight_only=True)),
        (("attn2.to_out.0",), SHARED),
        (("ffn.net.0.proj",), SHARED),
        # FeedForward(activation_fn="gelu-approximate"): net.2 reads GELU(net.0.proj(x))
        (("ffn.net.2",), dict(post_gelu=True)),
    )


def _sd3_groups(block: nn.Module):
    return groups_of(
        block,
        *_JOINT_ATTENTION,
        (("attn2.to_q", "attn2.to_k", "attn2.to_v"), SHARED),  # SD3.5 dual attention blocks
        (("attn2.to_out.0",), SHARED),
        *_JOINT_MLP_AND_ADALN,
    )


def _pixart_groups(block: nn.Module):
    return groups_of(
        block,
        (("attn1.to_q", "attn1.to_k", "attn1.to_v"), SHARED),
        (("attn1.to_out.0",), SHARED),
        # cross-attention: the query is quantized; K/V read the text embedding and stay 16-bit.
        (("attn2.to_q",), SHARED),
        (("attn2.to_out.0",), SHARED),
        (("ff.net.0.proj",), SHARED),
        (("ff.net.2",), dict(post_gelu=True)),
    )


def _sana_groups(block: nn.Module):
    return groups_of(
        block,
        (("attn1.to_q", "attn1.to_k", "attn1.to_v"), SHARED),
        (("attn1.to_out.0",), SHARED),
        (("attn2.to_q",), SHARED),  # cross-attention K/V stay 16-bit
        (("attn2.to_out.0",), SHARED),
        # GLUMBConv: the 1x1 convolutions are linears over channels; the depthwise 3x3 stays 16-bit.
        (("ff.conv_inverted",), SHARED),
        (("ff.conv_point",), SHARED),
    )


def _qwenimage_groups(block: nn.Module):
    # QwenImageTransformerBlock: joint image/text blocks laid out like FLUX double blocks, with
    # the streams' modules named img_*/txt_* (diffusers' own tensor-parallel plan lists the same
    # attention/MLP linears).
    return groups_of(
        block,
        # q/k/v of the image stream read the modulated image tokens; add_q/k/v the modulated text
        # tokens: one λ and one shared branch per stream (one fused GEMM each in the engine).
        *_JOINT_ATTENTION,
        (("img_mlp.net.0.proj",), SHARED),
        # FeedForward(activation_fn="gelu-approximate"): net.2 reads GELU(net.0.proj(x)).
        (("img_mlp.net.2",), dict(post_gelu=True)),
        (("txt_mlp.net.0.proj",), SHARED),
        (("txt_mlp.net.2",), dict(post_gelu=True)),
        # img_mod / txt_mod = Sequential(SiLU, Linear(dim, 6·dim)): the modulation (adaLN) linears,
        # read once per call from the timestep embedding: weight-only, as FLUX's norm1.linear.
        (("img_mod.1",), dict(weight_only=True)),
        (("txt_mod.1",), dict(weight_only=True)),
    )


def _is_gelu_ff(ff: nn.Module) -> bool:
    """A diffusers FeedForward whose second linear reads GELU(x) (not GEGLU's x·GELU(gate), which is signed)."""
    from diffusers.models.activations import GELU

    return isinstance(getattr(ff, "net", [None])[0], GELU)


def _unet_groups(model: nn.Module):
    """SDXL ``UNet2DConditionModel``, quantized as the SVDQuant paper does (arXiv 2411.05007, §5: the
    attention and feed-forward linears of the transformer blocks are 4-bit; the convolutions stay 16-bit).

    Per ``Transformer2DModel`` (in down, mid and up blocks): ``proj_in`` / ``proj_out`` (linears in SDXL,
    ``use_linear_projection=True``; 1×1 convs in SD1.x-style configs: both are linears over channels)
    and, per ``BasicTransformerBlock``, self-attention q/k/v (one group), its output projection, the
    cross-attention query and output projection, and both feed-forward linears. Cross-attention K/V read
    the text embedding and stay 16-bit, as in the PixArt / SANA adapters. SDXL's feed-forward is GEGLU:
    ``ff.net.2`` reads ``x·GELU(gate)``, which is signed, so it is not marked post-GELU.

    Kept 16-bit: every ResNet (3×3 convs, the 1×1 ``conv_shortcut`` s, the per-ResNet ``time_emb_proj``),
    down/upsamplers, ``conv_in`` / ``conv_out``, all norms, and the time / added-condition embeddings.
    """
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    specs = []
    for name, m in model.named_modules():
        if isinstance(m, Transformer2DModel):
            specs += [((f"{name}.proj_in",), SHARED), ((f"{name}.proj_out",), SHARED)]
        elif isinstance(m, BasicTransformerBlock):
            p = name + "."
            specs += [
                ((p + "attn1.to_q", p + "attn1.to_k", p + "attn1.to_v"), SHARED),
                ((p + "attn1.to_out.0",), SHARED),
                ((p + "attn2.to_q",), SHARED),
                ((p + "attn2.to_out.0",), SHARED),
                ((p + "ff.net.0.proj",), SHARED),
                ((p + "ff.net.2",), dict(post_gelu=_is_gelu_ff(m.ff))),
            ]
    return groups_of(model, *specs)


ADAPTERS = {
    # FLUX.1 [dev]/[schnell] and FLUX.1 Kontext (FluxKontextPipeline: the same transformer, the input image's
    # tokens appended to the latents'). Its pipelines pack 2x2 latents into a token: patch 2.
    "FluxTransformer2DModel": lambda: Adapter(
        "flux", ("transformer_blocks", "single_transformer_blocks"), ("encoder_hidden_states", "hidden_states"),
        _flux_groups, patch=2, batch_inputs=("hidden_states", "encoder_hidden_states", "temb")),
    # FLUX.2 [dev] (Flux2Pipeline) and [klein] (Flux2KleinPipeline): the single blocks take and return the
    # one joint stream [text | image] the model concatenates after the double blocks.
    "Flux2Transformer2DModel": lambda: Adapter(
        "flux2", ("transformer_blocks", "single_transformer_blocks"), ("encoder_hidden_states", "hidden_states"),
        _flux2_groups, stack_outputs={"single_transformer_blocks": ("hidden_states",)}, patch=2,
        model_groups=_FLUX2_MODEL_GROUPS),
    # Z-Image (ZImagePipeline): image tokens refined, caption tokens refined, then both through the main
    # layers; each block returns its one stream ``x``. The pipeline patchifies 2x2 latents.
    "ZImageTransformer2DModel": lambda: Adapter(
        "zimage", ("noise_refiner", "context_refiner", "layers"), ("x",), _zimage_groups, patch=2),
    # Wan 2.1 / 2.2 (WanPipeline, WanImageToVideoPipeline): one stack; patch (1, 2, 2) over (t, h, w).
    "WanTransformer3DModel": lambda: Adapter("wan", ("blocks",), ("hidden_states",), _wan_groups, patch=2),
    "SD3Transformer2DModel": lambda: Adapter(
        "sd3", ("transformer_blocks",), ("encoder_hidden_states", "hidden_states"), _sd3_groups),
    "PixArtTransformer2DModel": lambda: Adapter("pixart", ("transformer_blocks",), ("hidden_states",), _pixart_groups),
    "SanaTransformer2DModel": lambda: Adapter("sana", ("transformer_blocks",), ("hidden_states",), _sana_groups),
    # Qwen-Image and Qwen-Image-Edit (QwenImageEditPipeline, QwenImageEditPlusPipeline: the same transformer,
    # the input images' tokens appended to the latents').
    "QwenImageTransformer2DModel": lambda: Adapter(
        "qwenimage", ("transformer_blocks",), ("encoder_hidden_states", "hidden_states"), _qwenimage_groups),
    # The UNet's transformers sit inside down / mid / up blocks whose inputs (skip connections, the
    # ResNets' time embedding) are not one block's outputs, so block-by-block replay does not fit:
    # one calibration pass over the whole UNet (stacks=(), like the generic adapter) records every
    # group's 16-bit inputs at once.
    "UNet2DConditionModel": lambda: Adapter(
        "sdxl", (), (), _unet_groups,
        notes=["whole-UNet calibration in one pass (nested down/mid/up blocks: no block-by-block replay)"]),
}
