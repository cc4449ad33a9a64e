"""A small class-conditional FLUX-architecture model in pixel space, with a flow-matching Euler sampler.

The transformer is diffusers' ``FluxTransformer2DModel`` (double and single blocks, RoPE,
adaLN: everything SVDQuant's FLUX adapter targets), at a size that runs on a CPU:
32×32 RGB images packed 2×2 into 256 tokens of 12 channels. A class label plays the
prompt: :class:`ClassConditioner` maps it to a few "text" tokens and a pooled vector.
Label ``num_classes`` is the null class used for classifier-free guidance.

It is the project's offline default model and quality yardstick: ``TinyFluxPipeline.default()``
loads the trained CIFAR-10 weights shipped in the package when they are there, and
otherwise builds the architecture with deterministic random weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .._progress import progress as progress_bar
# the name, classes and size live apart: the command line checks them before diffusers is imported
from .._tiny_facts import CIFAR10_CLASSES, IMAGE_SIZE, PIPELINE_FILE, TINY_BASE, check_tiny_size  # noqa: F401
from ..images import to_pil

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-flux-cifar10"


def tiny_flux_config(**overrides) -> dict[str, Any]:
    """The default architecture: width 256 (4 heads × 64), 2 double + 6 single blocks: 11.1M parameters,
    22 MB in bf16 (the package ships it; the budget is 25 MB)."""
    cfg = dict(
        patch_size=1, in_channels=12, out_channels=12, num_layers=2, num_single_layers=6,
        attention_head_dim=64, num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=256,
        guidance_embeds=False, axes_dims_rope=(16, 24, 24),
    )
    cfg.update(overrides)
    return cfg


class ClassConditioner(ModelMixin, ConfigMixin):
    """Class label -> (text tokens ``[B, T, joint_dim]``, pooled vector ``[B, pooled_dim]``)."""

    @register_to_config
    def __init__(self, num_classes: int = 10, text_tokens: int = 4, joint_attention_dim: int = 256,
                 pooled_projection_dim: int = 256):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(num_classes + 1, text_tokens, joint_attention_dim))
        self.pooled = nn.Parameter(torch.randn(num_classes + 1, pooled_projection_dim))

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[labels], self.pooled[labels]


def pack(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H/2 · W/2, 4C]`` (2×2 patches as tokens)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = t.shape
    c = d // 4
    return t.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device=None) -> torch.Tensor:
    ii, jj = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(ii), ii, jj], -1).reshape(-1, 3).float().to(device)


@dataclass
class TinyOutput:
    images: Any  # list of PIL images, or a tensor [B, 3, H, W] in [0, 1] ("pt") / [-1, 1] ("latent")


class TinyFluxPipeline:
    """``pipe(prompt="cat")`` or ``pipe(class_labels=[3, 5])`` -> 32×32 images, diffusers-style."""

    def __init__(self, transformer: FluxTransformer2DModel, conditioner: ClassConditioner,
                 classes: Sequence[str] = CIFAR10_CLASSES, image_size: int = IMAGE_SIZE, guidance_scale: float = 1.0,
                 num_inference_steps: int = 20, info: dict | None = None):
        self.transformer, self.conditioner = transformer, conditioner
        self.classes, self.image_size = tuple(classes), image_size
        self.guidance_scale, self.num_inference_steps = guidance_scale, num_inference_steps
        self.info = info or {}

    # -- construction ------------------------------------------------------------------
    @classmethod
    def random(cls, seed: int = 0, dtype: torch.dtype = torch.float32, **config) -> "TinyFluxPipeline":
        """The architecture with deterministic random weights (no training)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            cfg = tiny_flux_config(**config)
            tr = FluxTransformer2DModel(**cfg)
            cond = ClassConditioner(len(CIFAR10_CLASSES), 4, cfg["joint_attention_dim"], cfg["pooled_projection_dim"])
        if dtype != torch.float32:
            tr, cond = tr.to(dtype=dtype), cond.to(dtype=dtype)
        return cls(tr.eval(), cond.eval(), info={"weights": f"random, seed {seed}"})

    @classmethod
    def default(cls, dtype: torch.dtype = torch.float32) -> "TinyFluxPipeline":
        """The shipped trained CIFAR-10 model if the package has it, else :meth:`random`."""
        if (ASSET_DIR / PIPELINE_FILE).exists():
            return cls.from_pretrained(ASSET_DIR, torch_dtype=dtype)
        return cls.random(dtype=dtype)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(path / "transformer")
        self.conditioner.save_pretrained(path / "conditioner")
        (path / PIPELINE_FILE).write_text(json.dumps({
            "_class_name": "TinyFluxPipeline", "transformer_class": type(self.transformer).__name__,
            "classes": list(self.classes), "image_size": self.image_size, "guidance_scale": self.guidance_scale,
            "num_inference_steps": self.num_inference_steps, "info": self.info,
        }, indent=1))

    @classmethod
    def from_pretrained(cls, path: str | Path, transformer: nn.Module | None = None,
                        torch_dtype: torch.dtype | None = None) -> "TinyFluxPipeline":
        path = Path(path)
        cfg = json.loads((path / PIPELINE_FILE).read_text())
        # safetensors only: a pickled .bin can run code as it loads (and a folder may come with a checkpoint)
        kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        kw["use_safetensors"] = True
        try:
            if transformer is None:
                transformer = FluxTransformer2DModel.from_pretrained(path / "transformer", **kw)
            cond = ClassConditioner.from_pretrained(path / "conditioner", **kw)
        except OSError as e:
            from . import pickled_only_error

            raise pickled_only_error(path, e) from None
        return cls(transformer.eval(), cond.eval(), cfg["classes"], cfg["image_size"], cfg["guidance_scale"],
                   cfg["num_inference_steps"], cfg.get("info"))

    def to(self, device=None, dtype=None) -> "TinyFluxPipeline":
        kw = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        self.transformer.to(**kw)
        self.conditioner.to(**kw)
        return self

    @property
    def device(self) -> torch.device:
        return self.conditioner.tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.conditioner.tokens.dtype

    @property
    def calibration_prompts(self) -> list[str]:
        return list(self.classes)

    # Ten class names at 256 tokens a call: 4 steps and 16 of the 40 calls keep the quantizer's token budget
    # (``eval_tokens``) drawn from every class and time while running a quarter of the forwards and replays of
    # the large-model defaults (8 steps, 128 snapshots): `svdquant quantize tiny` in about 30 s on 2 cores.
    calibration_defaults = {"steps": 4, "snapshots": 16}

    # -- sampling ------------------------------------------------------------------------
    def labels_for(self, prompt: str | Sequence[str]) -> list[int]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        labels = []
        for p in prompts:
            words = p.lower().replace(",", " ").split()
            hits = [i for i, c in enumerate(self.classes) if c in words or c == p.lower().strip()]
            if not hits:
                raise ValueError(f"this model draws only the classes {', '.join(self.classes)}; got prompt {p!r}")
            labels.append(hits[0])
        return labels

    def noise(self, n: int, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """``n`` images' starting noise: from one generator, or one generator per image (diffusers' convention: the
        same image then gets the same noise alone or in a batch)."""
        s = self.image_size
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise ValueError(f"{len(generator)} generators for {n} images: pass one generator, or one per image")
            return torch.cat([torch.randn(1, 3, s, s, generator=g, device="cpu") for g in generator]).to(
                self.device, self.dtype)
        return torch.randn(n, 3, s, s, generator=generator, device="cpu").to(self.device, self.dtype)

    def velocity(self, x: torch.Tensor, t: float | torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The model's flow-matching velocity ``ε − x₀`` at time ``t`` (1 = noise; a float or one per image)."""
        b = x.shape[0]
        text, pooled = self.conditioner(labels)
        t = t.to(x.device, x.dtype) if torch.is_tensor(t) else torch.full((b,), t, device=x.device, dtype=x.dtype)
        out = self.transformer(
            hidden_states=pack(x), encoder_hidden_states=text, pooled_projections=pooled,
            timestep=t,
            img_ids=image_ids(self.image_size, self.image_size, x.device),
            txt_ids=torch.zeros(text.shape[1], 3, device=x.device), return_dict=False,
        )[0]
        return unpack(out, self.image_size, self.image_size)

    def check_inputs(self, num_inference_steps=None, num_images_per_prompt: int = 1, guidance_scale=None,
                     height=None, width=None, output_type: str = "pil") -> None:
        """Raise ValueError (one line) for a call this model cannot honour, before any sampling."""
        from .. import _checks

        if num_inference_steps is not None:
            _checks.steps("num_inference_steps", num_inference_steps)
        _checks.count("num_images_per_prompt", num_images_per_prompt, hi=_checks.MAX_IMAGES)
        if guidance_scale is not None:
            _checks.real("guidance_scale", guidance_scale, lo=0)
        for name, v in (("height", height), ("width", width)):
            # The transformer was trained on one size only; any other would be a different model.
            check_tiny_size(self.image_size, name, v)
        if output_type not in ("pil", "pt", "latent"):
            raise ValueError(f"output_type={output_type!r}: use 'pil', 'pt' or 'latent'")

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str] | None = None, class_labels=None, num_inference_steps=None,
                 guidance_scale=None, generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None,
                 output_type: str = "pil", num_images_per_prompt: int = 1, progress: bool = False,
                 height: int | None = None, width: int | None = None, callback_on_step_end=None):
        """``callback_on_step_end(pipe, step, t, {"latents": x})`` runs after every step, as diffusers' does: it
        may return a dict with new ``latents``, or raise to stop sampling there (``svdquant serve`` does)."""
        self.check_inputs(num_inference_steps, num_images_per_prompt, guidance_scale, height, width, output_type)
        if class_labels is None:
            if prompt is None:
                raise ValueError("give a prompt (a class name) or class_labels")
            class_labels = self.labels_for(prompt)
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if len(labels) == 0 or labels.min() < 0 or labels.max() >= len(self.classes):
            raise ValueError(f"class_labels={list(class_labels)!r}: each label must be 0 to {len(self.classes) - 1} "
                             f"({', '.join(self.classes)})")
        labels = labels.repeat_interleave(num_images_per_prompt).to(self.device)
        # None = the model's default; 0 is an error above, never "the default".
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        g = self.guidance_scale if guidance_scale is None else guidance_scale
        if latents is not None and tuple(latents.shape) != (len(labels), 3, self.image_size, self.image_size):
            raise ValueError(f"latents of shape {tuple(latents.shape)}: expected "
                             f"{(len(labels), 3, self.image_size, self.image_size)}")
        x = latents.to(self.device, self.dtype) if latents is not None else self.noise(len(labels), generator)
        null = torch.full_like(labels, len(self.classes))
        ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
        # a bar on a terminal; a redirected log gets a plain line now and then (svdquant/_progress.py)
        for i, (t, t_next) in enumerate(progress_bar(list(zip(ts[:-1], ts[1:])), desc="sampling", unit="step",
                                                     enabled=progress, leave=False)):
            if g != 1.0:
                v_c, v_u = self.velocity(torch.cat([x, x]), t, torch.cat([labels, null])).chunk(2)
                v = v_u + g * (v_c - v_u)
            else:
                v = self.velocity(x, t, labels)
            x = x + (t_next - t) * v
            if callback_on_step_end is not None:
                x = (callback_on_step_end(self, i, t, {"latents": x}) or {}).get("latents", x)
        if output_type == "latent":
            return TinyOutput(x)
        img = ((x.float() + 1) / 2).clamp(0, 1)
        if output_type == "pt":
            return TinyOutput(img)
        return TinyOutput(to_pil(img))

