"""Every ```python block of README.md runs as written (issue 28.4): the first hour on a fresh machine.

The blocks run in README order, each in a fresh namespace (as a reader pastes it into a new script, so a missing
import is a NameError here too), all in one temporary folder (what one writes, such as ``tiny-int4``, a later one
reads), offline. A block that by nature needs a GPU or a hub download is marked in README.md by an HTML comment
right before it, ``<!-- not run: why -->``: it is skipped with that reason, after a check that every name it uses
is imported or assigned in the block itself. The LoRA block loads two LoRA files of the reader's; the test writes
two for the tiny model (``LORA_FILES``).
"""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

import tiny_models  # noqa: F401  first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
from safetensors.torch import save_file

README = Path(__file__).resolve().parent.parent / "README.md"
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")


def python_blocks() -> list[tuple[int, str, str | None]]:
    """(line of the opening fence, code, why it is not run or None) for each ```python block."""
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            m = NOT_RUN.fullmatch(prev.strip())
            blocks.append((start + 1, "\n".join(lines[start + 1:j]) + "\n", m.group(1) if m else None))
            i = j
        i += 1
    return blocks


BLOCKS = python_blocks()

# the LoRAs the LoRA block loads (a reader brings their own): PEFT keys for two of the tiny FLUX's layers
LORA_FILES = {"style.safetensors": 1, "detail.safetensors": 2}
TINY_LAYERS = {"transformer_blocks.0.attn.to_q": (256, 256), "single_transformer_blocks.0.proj_out": (256, 1280)}


def undefined_names(code: str) -> list[str]:
    """Names a statement of the block reads before the block imports or assigns them (or Python defines them)."""
    defined, missing = set(dir(builtins)), []
    for stmt in ast.parse(code).body:
        nodes = list(ast.walk(stmt))
        local = {n.id for c in nodes if isinstance(c, ast.comprehension) for n in ast.walk(c.target)
                 if isinstance(n, ast.Name)} | {a.arg for n in nodes if isinstance(n, ast.arg) for a in [n]}
        missing += [n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
                    and n.id not in defined | local]
        for n in nodes:
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                defined.update((a.asname or a.name).split(".")[0] for a in n.names)
            elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                defined.add(n.id)
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(n.name)
    return list(dict.fromkeys(missing))


def test_readme_has_python_blocks_and_runs_most():
    assert len(BLOCKS) >= 8
    assert sum(why is None for _, _, why in BLOCKS) >= 4  # the tiny model runs what needs no GPU


class Reader:
    """One temporary folder, where the blocks run in README order; a block runs the earlier ones it may need."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.done = 0  # blocks run (or passed over, when not run) so far
        g = torch.Generator().manual_seed(0)
        for name, seed in LORA_FILES.items():
            sd = {}
            for layer, (n, k) in TINY_LAYERS.items():
                sd[f"transformer.{layer}.lora_A.weight"] = torch.randn(4, k, generator=g) * 0.1
                sd[f"transformer.{layer}.lora_B.weight"] = torch.randn(n, 4, generator=g) * 0.1 * seed
            save_file(sd, str(folder / name))

    def run_through(self, index: int) -> None:
        while self.done <= index:
            line, code, why = BLOCKS[self.done]
            self.done += 1
            if why is None:
                exec(compile(code, f"README.md, the block at line {line}", "exec"), {"__name__": "__main__"})


@pytest.fixture(scope="module")
def reader(tmp_path_factory, one_torch_thread):
    folder = tmp_path_factory.mktemp("readme")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("HF_HUB_OFFLINE", "1")  # nothing is downloaded; a block that would is marked not run
        yield Reader(folder)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"line-{line}" for line, _, _ in BLOCKS])
def test_readme_python_block(reader, index):
    line, code, why = BLOCKS[index]
    assert not undefined_names(code), f"README.md line {line}: {undefined_names(code)} used but never defined"
    if why is not None:
        pytest.skip(f"README.md line {line}: not run: {why}")
    reader.run_through(index)
