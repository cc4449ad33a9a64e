"""Cog predictor: the same inputs as ``POST /v1/images/generations`` of ``svdquant serve``.

The inputs mirror the hosted SVDQuant FLUX endpoint (prompt, size, steps, guidance, seed, number and
format of outputs); they are checked by the server's own schema and engine, so Cog and ``svdquant serve``
accept and refuse the same requests. Not run in CI (Cog needs Docker and a GPU).
"""

import os
import random
import tempfile

import torch
from cog import BasePredictor, Input, Path

from svdquant.serve.engine import encode, load_engine
from svdquant.serve.schema import MAX_GUIDANCE, MAX_N, MAX_STEPS, GenerationRequest


class Predictor(BasePredictor):
    def setup(self) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.engine = load_engine(os.environ.get("SVDQUANT_MODEL", "tiny"), device, dtype)

    def predict(
        self,
        prompt: str = Input(description="What to draw (for the tiny model: a CIFAR-10 class name)"),
        size: str = Input(description="WIDTHxHEIGHT, sides multiples of 16; empty: the model's size", default=""),
        num_outputs: int = Input(description="Images to return", ge=1, le=MAX_N, default=1),
        num_inference_steps: int = Input(description="Denoising steps; 0: the model's default", ge=0,
                                         le=MAX_STEPS, default=0),
        guidance_scale: float = Input(description="Guidance; -1: the model's default", ge=-1, le=MAX_GUIDANCE,
                                      default=-1),
        seed: int = Input(description="Seed; -1: random. Image i uses seed + i", default=-1),
        output_format: str = Input(description="Image format", choices=["png", "jpeg", "webp"], default="webp"),
    ) -> list[Path]:
        req = GenerationRequest(prompt=prompt, size=size or None, n=num_outputs,
                                num_inference_steps=num_inference_steps or None,
                                guidance_scale=None if guidance_scale < 0 else guidance_scale,
                                seed=None if seed < 0 else seed, output_format=output_format)
        settings = self.engine.settings(req)   # a prompt or size this model cannot draw: one clear error
        base = req.seed if req.seed is not None else random.randrange(2**31)
        seeds = [base + i for i in range(req.n)]
        images = self.engine.generate(settings, [req.prompt] * req.n, seeds)
        out = Path(tempfile.mkdtemp())
        paths = []
        for s, im in zip(seeds, images):
            paths.append(out / f"out-{s}.{output_format}")
            paths[-1].write_bytes(encode(im, output_format))
        return paths
