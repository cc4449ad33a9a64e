"""Exporting, first step: whether a checkpoint can be written as a Nunchaku file, from its metadata alone, with
every obstacle named at once (:func:`check_exportable`)."""

from __future__ import annotations

from ...checkpoint import CheckpointError
from ...recipes import POST_GELU_SHIFT
from .keymap import AWQ, GROUP, LAYOUTS


def _is_w4a4_float(cfg: dict) -> bool:
    return cfg.get("weights") == "int4" and cfg.get("activations") == "int4" and cfg.get("group_size") == GROUP


def check_exportable(layers: dict[str, dict], model_class: str, model_config: dict, where) -> int:
    """Whether a checkpoint with these layers (``svdquant.json``'s ``layers``) can be written as a Nunchaku file,
    from its metadata alone; returns the branch rank. Raises :class:`CheckpointError` naming every obstacle at
    once, with the one re-quantization that removes them all: a user once re-quantized for ``--dtype bf16``
    (134 s) only to be told then about ``--recipe w4a4-float``."""
    layout = LAYOUTS.get(model_class)
    if layout is None:
        known = " and ".join(f"{lay.label} ({lay.model_class})" for lay in LAYOUTS.values())
        raise CheckpointError(f"{where} quantizes a {model_class}; svdquant writes Nunchaku files of {known} "
                              "models only")
    adapter = f"svdquant's {layout.label} adapter"
    found = _Obstacles()
    dtypes = set()
    for stack, key in zip(layout.stacks, layout.counts):
        for i in range(int(model_config.get(key, 0))):
            pre = f"{stack}.{i}"
            for spec in layout.plans[stack]:
                names = (spec.ours,) if isinstance(spec, AWQ) else spec.ours
                for o in names:
                    name = f"{pre}.{o}"
                    cfg = layers.get(name)
                    if cfg is None:
                        found.add("16-bit", f"{where} keeps {name} 16-bit; Nunchaku's {layout.label} quantizes every "
                                  "block linear", f"quantize with {adapter} (no --include/--exclude)")
                        continue
                    if cfg.get("dtype") not in ("bfloat16", "float16"):
                        found.add("dtype", f"{where} is in {cfg.get('dtype')}; Nunchaku runs bf16 or fp16 models",
                                  "quantize the model in bfloat16 (--dtype bf16)", "--dtype bf16")
                    else:
                        dtypes.add(cfg["dtype"])
                    if isinstance(spec, AWQ):
                        if cfg.get("weights") not in ("int4", "int4z") or cfg.get("activations") is not None \
                                or cfg.get("rank", 0) or cfg.get("group_size") != GROUP:
                            found.add("recipe", f"{where}: {name} is W{cfg.get('weights')}A"
                                      f"{cfg.get('activations') or 16} rank {cfg.get('rank')}; Nunchaku's adaLN layers "
                                      "are INT4 W4A16, group 64, no branch", "quantize with --recipe w4a4-float",
                                      "--recipe w4a4-float")
                        continue
                    if not _is_w4a4_float(cfg):
                        found.add("recipe", f"{where}: {name} is W{cfg.get('weights')}A{cfg.get('activations') or 16} "
                                  f"(group {cfg.get('group_size')}); Nunchaku runs the paper's INT4 W4A4 with 16-bit "
                                  "group scales (group 64) only, and two-level scales are not exactly 16-bit",
                                  "re-quantize with --recipe w4a4-float", "--recipe w4a4-float")
                    k, n = cfg["in_features"], cfg["out_features"]
                    if k % 128 or n % 128:
                        found.add("size", f"{where}: {name} is {n} x {k}; Nunchaku's kernels need both sides to be "
                                  "multiples of 128", None)
                    if cfg.get("rank", 0) % 16 or (layout.strict and not cfg.get("rank", 0)):
                        found.add("rank", f"{where}: {name} has rank {cfg.get('rank')}; Nunchaku's branch rank is a "
                                  f"multiple of 16{', not 0' if layout.strict else ''}", "re-quantize with --rank 32",
                                  "--rank 32")
                    want_shift = POST_GELU_SHIFT if spec.post_gelu else 0.0
                    want_from = (cfg["in_features"] - _mlp_width(model_config)) if len(spec.theirs) == 2 else 0
                    if _is_w4a4_float(cfg) and (cfg.get("act_shift", 0.0) != want_shift
                                                or cfg.get("act_unsigned_from", 0) != want_from):
                        found.add("shift", f"{where}: {name} shifts its inputs by {cfg.get('act_shift')} from "
                                  f"channel {cfg.get('act_unsigned_from')}; Nunchaku shifts exactly the post-GELU "
                                  f"inputs by {POST_GELU_SHIFT}", f"re-quantize with {adapter}")
    if len(dtypes) > 1:
        found.add("dtype", f"{where} mixes {sorted(dtypes)} layers; a Nunchaku file has one 16-bit dtype",
                  "quantize the model in bfloat16 (--dtype bf16)", "--dtype bf16")
    rank = _uniform_rank(layers, where, found)
    found.raise_if_any(where)
    return rank


class _Obstacles:
    """What stands between a checkpoint and a Nunchaku file: the first case of each kind (with how many more),
    and the fix, reported together by :meth:`raise_if_any`."""

    def __init__(self):
        self.kinds: dict[str, list] = {}  # kind -> [text, fix, option, count]

    def add(self, kind: str, text: str, fix: str | None, option: str | None = None) -> None:
        if kind in self.kinds:
            self.kinds[kind][3] += 1
        else:
            self.kinds[kind] = [text, fix, option, 1]

    def raise_if_any(self, where) -> None:
        if not self.kinds:
            return
        parts = [text + (f" ({count - 1} more like it)" if count > 1 else "")
                 for text, _, _, count in self.kinds.values()]
        if len(parts) == 1:
            (text, fix, _, _), = self.kinds.values()
            raise CheckpointError(parts[0] + (f": {fix}" if fix else ""))
        options = list(dict.fromkeys(o for _, _, o, _ in self.kinds.values() if o))
        others = list(dict.fromkeys(f for _, f, o, _ in self.kinds.values() if f and not o))
        fixes = ([f"re-quantize once with {' '.join(options)}"] if options else []) + others
        if any(f is None for _, f, _, _ in self.kinds.values()):
            fixes.append("a model whose layer sizes are multiples of 128")
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(parts, 1))
        raise CheckpointError(f"{where} cannot be written as a Nunchaku file, for {len(parts)} reasons: {listed}. "
                              f"Fix them all at once: {'; '.join(fixes)}")


def _mlp_width(model_config: dict) -> int:
    """The single block's GELU part of proj_out: 4 · dim (FLUX's mlp_ratio)."""
    return 4 * int(model_config.get("num_attention_heads", 24)) * int(model_config.get("attention_head_dim", 128))


def _uniform_rank(layers: dict[str, dict], where, found: _Obstacles) -> int:
    """Nunchaku's loader gives every W4A4 layer the rank in quantization_config; a proj_out imported from a
    published file has twice that (two block-diagonal branches)."""
    plain = {cfg.get("rank", 0) for name, cfg in layers.items()
             if _is_w4a4_float(cfg) and not name.endswith(".proj_out")}
    if len(plain) > 1:
        found.add("ranks", f"{where} mixes branch ranks {sorted(plain)}; Nunchaku loads one rank for all layers",
                  "re-quantize with one --rank", "--rank 32")
        return 0
    rank = plain.pop() if plain else 0
    for name, cfg in layers.items():
        if name.endswith(".proj_out") and _is_w4a4_float(cfg) and cfg.get("rank", 0) not in (rank, 2 * rank):
            found.add("ranks", f"{where}: {name} has rank {cfg.get('rank')}, the other layers {rank}; Nunchaku "
                      "loads one rank for all layers", "re-quantize with one --rank", "--rank 32")
    return rank
