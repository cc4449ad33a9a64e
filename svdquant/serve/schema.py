"""The request and response of ``POST /v1/images/generations`` (OpenAI's images API plus our fields).

Everything here is model-independent: a request that fails these checks is malformed for any model and
gets 422. What a particular model cannot draw (a prompt that is not a CIFAR-10 class, a size the tiny model
was not trained at) is checked by the engine and gets 400. Neither ever reaches the worker.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .. import _checks

MAX_PROMPT_CHARS = 2000        # FLUX's T5 reads 512 tokens; more text than this is a pasted document
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 16, 2048, 16   # 16: FLUX/SD3 latents are 8x downsampled, then 2x2 patches
MAX_N = 4
MAX_STEPS = 100                # a served request, unlike a CLI run, holds the one worker for everyone
MAX_GUIDANCE = 30.0
MAX_LORA_STRENGTH = 4.0
OUTPUT_FORMATS = ("png", "jpeg", "webp")
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


def parse_size(size: str) -> tuple[int, int]:
    """``"WxH"`` -> ``(width, height)``; ValueError with the rule broken."""
    m = _SIZE.match(size.strip().lower())
    if not m:
        raise ValueError(f"size {size!r} is not WIDTHxHEIGHT, e.g. \"512x512\"")
    w, h = int(m[1]), int(m[2])
    for side in (w, h):
        if side < MIN_SIDE or side > MAX_SIDE:
            raise ValueError(f"size {size!r}: each side must be between {MIN_SIDE} and {MAX_SIDE} pixels")
        if side % SIDE_MULTIPLE:
            raise ValueError(f"size {size!r}: each side must be a multiple of {SIDE_MULTIPLE}")
    return w, h


class GenerationRequest(BaseModel):
    # Unknown fields are refused: a typo such as "num_steps" would otherwise be ignored silently.
    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = None                    # None: the model's own size
    response_format: Literal["b64_json"] = "b64_json"   # no "url": this server keeps no files
    user: str | None = None                    # OpenAI clients may send it; accepted and unused
    seed: int | None = Field(None, ge=0, le=_checks.MAX_SEED)
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    loras: dict[str, float] = Field(default_factory=dict)   # strength per loaded LoRA name

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the prompt is empty; say what to draw")
        if len(v) > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt has {len(v)} characters; at most {MAX_PROMPT_CHARS} are accepted")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is not None:
            parse_size(v)
        return v

    @field_validator("guidance_scale")
    @classmethod
    def _guidance(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("guidance_scale must be a finite number")
        return v

    @field_validator("loras")
    @classmethod
    def _loras(cls, v: dict[str, float]) -> dict[str, float]:
        for name, s in v.items():
            if not math.isfinite(s) or abs(s) > MAX_LORA_STRENGTH:
                raise ValueError(f"LoRA {name!r} strength {s}: use a number between -{MAX_LORA_STRENGTH:g} "
                                 f"and {MAX_LORA_STRENGTH:g}")
        return v


class ImageData(BaseModel):
    b64_json: str
    seed: int                                  # the seed that redraws exactly this image with n=1
    revised_prompt: str | None = None


class GenerationResponse(BaseModel):
    created: int
    data: list[ImageData]


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    """OpenAI's error shape, so its clients show the message."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
