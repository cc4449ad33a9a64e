"""The request and response of ``POST /v1/images/generations`` (OpenAI's images API plus our fields), and how a
body becomes a request.

Everything here is model-independent: a body that is not a JSON object of the right fields is malformed for
any model and gets 400 (not JSON), 413 (too large), 415 (not sent as JSON) or 422 (a field wrong). What a
particular model cannot draw (a prompt that is not a CIFAR-10 class, a size the tiny model was not trained at)
is checked by the engine and gets 400. None of it ever reaches the worker. Every refusal is one
:class:`RequestRefused` with OpenAI's error shape (:func:`error_body`) and a ``kind`` that /metrics counts.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .. import _checks

MAX_PROMPT_CHARS = 2000        # FLUX's T5 reads 512 tokens; more text than this is a pasted document
MAX_NAME_CHARS = 256           # model, user, LoRA names: identifiers, not documents
MAX_LORAS = 16
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 16, 2048, 16   # 16: FLUX/SD3 latents are 8x downsampled, then 2x2 patches
MAX_N = 4
MAX_STEPS = 100                # a served request, unlike a CLI run, holds the one worker for everyone
MAX_GUIDANCE = 30.0
MAX_LORA_STRENGTH = 4.0
MAX_TIMEOUT_S = 3600.0
OUTPUT_FORMATS = ("png", "jpeg", "webp")
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
MAX_JSON_DEPTH = 8             # the deepest valid body is 3 levels (loras); a 100,000-deep one is an attack


class RequestRefused(Exception):
    """A request answered with an error before any work: HTTP ``status``, OpenAI's error body, counted under
    ``kind`` in /metrics."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers or {}

    def body(self) -> dict:
        return error_body(str(self), "server_error" if self.status >= 500 else "invalid_request_error",
                          self.param, self.code)


def parse_size(size: str) -> tuple[int, int]:
    """``"WxH"`` -> ``(width, height)``; ValueError with the rule broken."""
    m = _SIZE.match(size.strip().lower())
    if not m:
        raise ValueError(f"size {size[:40]!r} is not WIDTHxHEIGHT, e.g. \"512x512\"")
    w, h = int(m[1]), int(m[2])
    for side in (w, h):
        if side < MIN_SIDE or side > MAX_SIDE:
            raise ValueError(f"size {size!r}: each side must be between {MIN_SIDE} and {MAX_SIDE} pixels")
        if side % SIDE_MULTIPLE:
            raise ValueError(f"size {size!r}: each side must be a multiple of {SIDE_MULTIPLE}")
    return w, h


class GenerationRequest(BaseModel):
    # Unknown fields are refused: a typo such as "num_steps" would otherwise be ignored silently. Strict: "n": "2"
    # or "n": true is a client bug to report, not to guess at (JSON integers still fill float fields).
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    model: str | None = Field(None, max_length=MAX_NAME_CHARS)
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = Field(None, max_length=16)      # None: the model's own size
    response_format: Literal["b64_json"] = "b64_json"   # no "url": this server keeps no files
    user: str | None = Field(None, max_length=MAX_NAME_CHARS)   # OpenAI clients may send it; accepted and unused
    seed: int | None = Field(None, ge=0, le=_checks.MAX_SEED)
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    loras: dict[str, float] = Field(default_factory=dict, max_length=MAX_LORAS)   # strength per loaded LoRA name
    # seconds this request may take from acceptance, queue included; past it the work stops (at the next step)
    # and the answer is 504. None: as long as it takes
    timeout: float | None = Field(None, gt=0.0, le=MAX_TIMEOUT_S, allow_inf_nan=False)

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

    @field_validator("loras")
    @classmethod
    def _loras(cls, v: dict[str, float]) -> dict[str, float]:
        for name, s in v.items():
            if len(name) > MAX_NAME_CHARS:
                raise ValueError(f"loras: a LoRA name has {len(name)} characters; names are at most {MAX_NAME_CHARS}")
            if abs(s) > MAX_LORA_STRENGTH or s != s:
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


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape, so its clients show the message."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ------------------------------------------------------------------------------------------------ body -> request
def parse_request(body: bytes, content_type: str | None) -> GenerationRequest:
    """The request a body holds, or RequestRefused naming the one thing to fix. Checked in order: sent as JSON,
    not empty, UTF-8, JSON (no duplicate keys, no NaN / Infinity, no 5,000-digit numbers, at most
    MAX_JSON_DEPTH deep), an object, then the fields (strict types)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        hint = " (its text is JSON: set the header)" if _looks_like_json(body) else ""
        raise RequestRefused(415, f"send the body as JSON with Content-Type: application/json; this request says "
                                  f"{(content_type or 'nothing')[:60]!r}{hint}", "unsupported_media_type")
    if not body.strip():
        raise RequestRefused(400, "the request body is empty; send a JSON object such as {\"prompt\": \"cat\"}",
                             "malformed")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestRefused(400, f"the request body is not UTF-8 (byte {e.start}); JSON must be UTF-8",
                             "malformed") from None
    obj = _json(text)
    if not isinstance(obj, dict):
        raise RequestRefused(422, f"the body must be a JSON object of fields, such as {{\"prompt\": \"cat\"}}; it is "
                                  f"a JSON {type(obj).__name__.replace('dict', 'object').replace('str', 'string')}",
                             "invalid")
    try:
        return GenerationRequest.model_validate(obj)
    except ValidationError as e:
        msg, param = one_line(e)
        raise RequestRefused(422, msg, "invalid", param) from None


def _looks_like_json(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        return False


def _json(text: str):
    def pairs(items):
        out = {}
        for k, v in items:
            if k in out:
                raise _Refuse(f"the field {k[:60]!r} appears twice in the body; send it once", k)
            out[k] = v
        return out

    def constant(name):
        raise _Refuse(f"{name} is not a JSON number; send a finite number", None)

    if _depth(text) > MAX_JSON_DEPTH:
        raise RequestRefused(400, f"the body's JSON is nested deeper than {MAX_JSON_DEPTH} levels; a request is a "
                                  "flat object", "malformed")
    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except _Refuse as e:
        raise RequestRefused(422 if e.param else 400, str(e), "invalid" if e.param else "malformed", e.param) from None
    except json.JSONDecodeError as e:
        raise RequestRefused(400, f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                             "malformed") from None
    except (ValueError, RecursionError) as e:  # Python refuses integers of more than 4300 digits
        raise RequestRefused(400, f"the body's JSON cannot be read ({str(e)[:100]}); send numbers of ordinary size",
                             "malformed") from None


_ESCAPES, _STRINGS = re.compile(r"\\.", re.S), re.compile(r'"[^"]*"')


class _Refuse(ValueError):
    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


def _depth(text: str) -> int:
    """How deep the brackets nest, outside strings (a bound before parsing: json's recursion is not the limit to
    meet first)."""
    bare = _STRINGS.sub("", _ESCAPES.sub("", text))
    if bare.count("[") + bare.count("{") <= MAX_JSON_DEPTH:
        return bare.count("[") + bare.count("{")
    depth = deepest = 0
    for ch in bare:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def one_line(exc: ValidationError) -> tuple[str, str | None]:
    """pydantic reports a list of errors; a client wants the first, said plainly, naming the field."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = err.get("type")
    msg = err.get("msg", "invalid request").removeprefix("Value error, ")
    if kind == "extra_forbidden":
        msg = f"unknown field {param!r}"
    elif kind == "missing":
        msg = f"{param} is required"
    elif kind in ("int_type", "float_type", "string_type", "dict_type", "bool_type"):
        want = {"int_type": "an integer", "float_type": "a number", "string_type": "a string",
                "dict_type": "an object", "bool_type": "true or false"}[kind]
        msg = f"{param}: must be {want}, not {_json_type(err.get('input'))} (types are not converted)"
    elif param and kind != "value_error":  # our own validators' messages name the field already
        msg = f"{param}: {msg}"
    return msg, param


def _json_type(v) -> str:
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, str):
        return f"the string {v[:20]!r}"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    return "null" if v is None else f"a JSON {'array' if isinstance(v, list) else 'object'}"
