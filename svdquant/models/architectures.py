"""Adapters for the diffusers transformers SVDQuant targets (DESIGN.md §1, §6).

Kept 16-bit everywhere: embedders (patch/x/context/time/text/caption), the final norm
and projection, q/k RMSNorms and attention math (they are not in any group).
"""

from __future__ import annotations

import torch.nn as nn

from .base import Adapter, groups_of

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


ADAPTERS = {
    "FluxTransformer2DModel": lambda: Adapter(
        "flux", ("transformer_blocks", "single_transformer_blocks"), ("encoder_hidden_states", "hidden_states"),
        _flux_groups),
    "SD3Transformer2DModel": lambda: Adapter(
        "sd3", ("transformer_blocks",), ("encoder_hidden_states", "hidden_states"), _sd3_groups),
    "PixArtTransformer2DModel": lambda: Adapter("pixart", ("transformer_blocks",), ("hidden_states",), _pixart_groups),
    "SanaTransformer2DModel": lambda: Adapter("sana", ("transformer_blocks",), ("hidden_states",), _sana_groups),
}
