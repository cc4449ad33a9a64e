"""Which (prompt, step) pairs a calibration draws, and the pipeline calls that run them.

The draw is a fixed-seed sample of ``snapshots`` pairs out of ``prompts × steps`` (:func:`draw_plan`). Prompts drawn
at exactly the same steps then share a pipeline call (:func:`calibration_batches`, ``Calibration.batch_size``
of them at most): each call streams the model's weights and launches its kernels once for all of its prompts, and
since every prompt of a call stops at the same last step, batching runs no step a prompt alone would not.
"""

from __future__ import annotations

import random
from typing import Any

import torch


def draw_plan(n_prompts: int, steps: int, snapshots: int, seed: int) -> dict[int, set[int]]:
    """A fixed-seed draw of ``snapshots`` (prompt, step) pairs out of ``n_prompts × steps``."""
    pairs = [(p, s) for p in range(n_prompts) for s in range(steps)]
    rng = random.Random(seed)
    chosen = pairs if snapshots >= len(pairs) else rng.sample(pairs, snapshots)
    plan: dict[int, set[int]] = {}
    for p, s in chosen:
        plan.setdefault(p, set()).add(s)
    return plan


def calibration_batches(plan: dict[int, set[int]], size: int) -> list[tuple[list[int], set[int]]]:
    """The pipeline calls that run ``plan``: prompts drawn at exactly the same steps go through the pipeline
    together, ``size`` at most per call (in prompt order; calls ordered by their first prompt). A call stops after
    its last drawn step, where each of its prompts alone would stop, so batching runs no extra denoising step and
    records exactly the drawn (prompt, step) pairs."""
    together: dict[frozenset[int], list[int]] = {}
    for p in sorted(plan):
        together.setdefault(frozenset(plan[p]), []).append(p)
    calls = [(ps[i:i + size], set(steps)) for steps, ps in together.items() for i in range(0, len(ps), size)]
    return sorted(calls, key=lambda c: c[0][0])


# Pipeline arguments given once that hold one text per prompt: repeated for each prompt of a batched call
PER_PROMPT_TEXTS = ("prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3")


def prompt_call(prompts: list[str], rows: list[int], seed: int, pipeline_kwargs: dict) -> dict[str, Any]:
    """The pipeline's keyword arguments for one call of the prompts ``rows``: one prompt as a string with its
    generator, as a user calls it; several as lists, each prompt with the generator it would have alone (diffusers
    draws a batch's noise per generator), and a second text or a negative prompt given once (a string, or a list of
    one) repeated for each."""
    if len(rows) == 1:
        return {**pipeline_kwargs, "prompt": prompts[rows[0]],
                "generator": torch.Generator("cpu").manual_seed(seed + rows[0])}

    def per_prompt(k, v):
        if k in PER_PROMPT_TEXTS and isinstance(v, (str, list, tuple)):
            if isinstance(v, str):
                return [v] * len(rows)
            if len(v) == 1:
                return list(v) * len(rows)
        return v

    kw = {k: per_prompt(k, v) for k, v in pipeline_kwargs.items()}
    return {**kw, "prompt": [prompts[i] for i in rows],
            "generator": [torch.Generator("cpu").manual_seed(seed + i) for i in rows]}
