"""Recipes: the smoothing grid, named defaults, validation, serialization."""

from __future__ import annotations

import dataclasses
import json

import pytest

from svdquant import (
    RECIPES, FP8Config, Int4Config, NF4Config, NVFP4Config, QuantConfig, W4A16Config, W8A8Config, get_recipe,
)
from svdquant.recipes import POST_GELU_SHIFT, default_smooth_grid


# ---------------------------------------------------------------------------- smoothing grid
def test_default_grid_has_39_candidates():
    grid = default_smooth_grid()
    assert len(grid) == 39
    assert len(set(grid)) == 39  # no duplicates
    assert grid[0] == (0.0, 0.0)  # identity first
    alphas = [i / 100 for i in range(5, 100, 5)]  # 0.05 .. 0.95
    assert len(alphas) == 19
    expected = {(0.0, 0.0)} | {(a, 0.0) for a in alphas} | {(a, (100 - round(a * 100)) / 100) for a in alphas}
    assert set(grid) == expected
    # the exact values, not approximately: 0.15 is the double closest to 0.15, 1 - 0.95 is 0.05
    assert (0.15, 0.85) in grid and (0.95, 0.05) in grid and (0.05, 0.95) in grid and (0.5, 0.5) in grid
    assert grid[1:20] == tuple((a, 0.0) for a in alphas)
    assert all(abs(a + b - 1.0) < 1e-12 for a, b in grid[20:])


def test_recipe_uses_default_grid():
    assert Int4Config().smooth_grid == default_smooth_grid()
    assert RECIPES["nvfp4"].smooth_grid == default_smooth_grid()


def test_post_gelu_shift_constant():
    assert POST_GELU_SHIFT == 0.171875  # 11/64, exact in bf16/fp16


# ---------------------------------------------------------------------------- named recipes
def test_registry_names():
    assert sorted(RECIPES) == ["fp8", "int4", "nf4", "nvfp4", "w4a16", "w4a4", "w4a4-float", "w8a8"]
    for name, r in RECIPES.items():
        assert r.name == name
        assert isinstance(r, QuantConfig)


def test_int4_defaults():
    r = get_recipe("int4")
    assert isinstance(r, Int4Config)
    assert (r.weights, r.activations, r.group_size, r.rank, r.method) == ("int4m", "int8", 64, 32, "svdquant")
    assert r.svd == "randomized" and r.iterations == 10
    assert r.smooths and r.lowrank == "svd" and r.branch_rank == 32
    assert r.act_group_size == 0  # INT8 per token


def test_w4a4_recipes():
    r = get_recipe("w4a4")
    assert (r.weights, r.activations, r.act_group_size) == ("int4m", "int4m", 64)
    f = get_recipe("w4a4-float")
    assert (f.weights, f.activations, f.act_group_size) == ("int4", "int4", 64)
    # a dash-named recipe still takes an ablation method after a further dash
    assert get_recipe("w4a4-float-naive").method == "naive" and get_recipe("w4a4-float-naive").weights == "int4"
    assert get_recipe("int4-lorc").weights == "int4m"


def test_nvfp4_defaults():
    r = get_recipe("nvfp4")
    assert isinstance(r, NVFP4Config)
    assert (r.weights, r.activations, r.group_size, r.rank, r.method) == ("nvfp4", "nvfp4", 16, 32, "svdquant")


def test_w8a8_defaults():
    r = get_recipe("w8a8")
    assert isinstance(r, W8A8Config)
    assert (r.weights, r.activations, r.group_size, r.rank, r.method) == ("int8", "int8", 0, 16, "svdquant")
    assert r.branch_rank == 16


def test_fp8_defaults():
    r = get_recipe("fp8")
    assert isinstance(r, FP8Config)
    assert (r.weights, r.activations, r.group_size, r.rank, r.method) == ("fp8", "fp8", 0, 0, "naive")
    assert r.branch_rank == 0 and r.lowrank == "none"


def test_nf4_is_weight_only():
    r = get_recipe("nf4")
    assert isinstance(r, NF4Config)
    assert (r.weights, r.activations, r.group_size, r.rank, r.method) == ("nf4", None, 64, 0, "naive")
    assert not r.smooths


def test_w4a16_is_weight_only_int4():
    r = get_recipe("w4a16")
    assert isinstance(r, W4A16Config)
    assert (r.weights, r.activations, r.group_size, r.rank, r.method) == ("int4", None, 64, 0, "naive")


@pytest.mark.parametrize("method,smooths,lowrank,branch", [
    ("svdquant", True, "svd", 32), ("naive", False, "none", 0), ("smooth", True, "none", 0),
    ("lowrank", False, "svd", 32), ("lorc", True, "lorc", 32),
])
def test_method_properties(method, smooths, lowrank, branch):
    r = Int4Config(method=method)
    assert (r.smooths, r.lowrank, r.branch_rank) == (smooths, lowrank, branch)


def test_get_recipe_overrides_and_passthrough():
    r = get_recipe("int4", rank=64, svd="full")
    assert (r.rank, r.svd, r.group_size) == (64, "full", 64)
    assert RECIPES["int4"].rank == 32  # the registry entry is untouched
    custom = Int4Config(rank=16)
    assert get_recipe(custom) is custom
    assert get_recipe(custom, iterations=3).iterations == 3


def test_get_recipe_unknown_name():
    with pytest.raises(ValueError, match=r"unknown recipe 'int3'.*int4"):
        get_recipe("int3")


def test_recipes_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RECIPES["int4"].rank = 8  # type: ignore[misc]


def test_replace_validates():
    r = Int4Config().replace(rank=48)
    assert r.rank == 48 and isinstance(r, Int4Config)
    with pytest.raises(ValueError, match="rank"):
        Int4Config().replace(rank=0)


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,match", [
    (dict(weights="int3"), r"weights='int3' is not a weight format"),
    (dict(activations="nf4"), r"activations='nf4' is not an activation format"),
    (dict(method="gptq"), r"method='gptq' is unknown"),
    (dict(svd="qr"), r"svd='qr' is unknown"),
    (dict(rank=-1), r"rank must be >= 0"),
    (dict(rank=0), r"method='svdquant' needs rank > 0"),
    (dict(rank=0, method="lorc"), r"method='lorc' needs rank > 0"),
    (dict(rank=0, method="lowrank"), r"method='lowrank' needs rank > 0"),
    (dict(activations=None), r"smoothing needs quantized activations"),
    (dict(activations=None, method="smooth", rank=0), r"smoothing needs quantized activations"),
    (dict(weights="nvfp4", activations="nvfp4", group_size=64), r"nvfp4 uses groups of 16"),
    (dict(weights="int8", activations="int8", group_size=64), r"int8 uses one scale per row"),
    (dict(weights="fp8", activations="fp8", group_size=16), r"fp8 uses one scale per row"),
    (dict(group_size=0), r"int4m needs a positive even group_size"),
    (dict(group_size=63), r"int4m needs a positive even group_size"),
    (dict(weights="nf4", activations=None, method="naive", rank=0, group_size=-64), r"nf4 needs a positive even"),
])
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_valid_variants_are_accepted():
    QuantConfig(rank=0, method="naive")
    QuantConfig(rank=0, method="smooth")
    QuantConfig(activations=None, method="lowrank", rank=16)
    NVFP4Config(group_size=32)
    Int4Config(group_size=128, rank=16)


# ---------------------------------------------------------------------------- serialization
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_to_dict_from_dict_round_trip(name):
    r = RECIPES[name].replace(iterations=7, eval_tokens=64)
    d = r.to_dict()
    assert d["name"] == name and d["iterations"] == 7
    assert isinstance(d["smooth_grid"], list) and d["smooth_grid"][1] == [0.05, 0.0]
    d2 = json.loads(json.dumps(d))  # JSON-safe
    back = QuantConfig.from_dict(d2)
    for f in dataclasses.fields(QuantConfig):
        assert getattr(back, f.name) == getattr(r, f.name), f.name
    assert back.smooth_grid == default_smooth_grid()  # tuples again, not lists
    assert back.to_dict() == d


def test_from_dict_rejects_unknown_fields():
    d = Int4Config().to_dict()
    d["bits"] = 3
    with pytest.raises(ValueError, match=r"unknown fields \['bits'\]"):
        QuantConfig.from_dict(d)


def test_from_dict_validates():
    d = Int4Config().to_dict()
    d["rank"] = 0
    with pytest.raises(ValueError, match="needs rank > 0"):
        QuantConfig.from_dict(d)


def test_from_dict_custom_grid():
    d = Int4Config(smooth_grid=((0.0, 0.0), (0.5, 0.25))).to_dict()
    assert d["smooth_grid"] == [[0.0, 0.0], [0.5, 0.25]]
    assert QuantConfig.from_dict(d).smooth_grid == ((0.0, 0.0), (0.5, 0.25))


def test_from_dict_returns_equal_recipe():
    r = Int4Config()
    back = Int4Config.from_dict(r.to_dict())
    assert back == r
