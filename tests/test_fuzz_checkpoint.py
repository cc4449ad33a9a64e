"""Fuzzing the loader with hostile checkpoints (issue 14, part 4).

One real tiny FLUX checkpoint is quantized and saved once; hypothesis then rewrites its tensor file
or its ``svdquant.json`` (truncations, flipped bytes, headers that lie about dtype, shape, offsets
or their own length, malformed or huge headers, missing and extra tensors, wrong packed sizes,
NaN / Inf values, impossible codes) and loads it. Every case must end in a model, a
``CheckpointError`` or (NaN / Inf in a kept 16-bit layer) a ``NonFiniteWarning``: any other
exception fails the test, and hypothesis' deadline fails a case that hangs or allocates for long.
Where the damage is certain (truncation, a missing tensor...) the case must be a CheckpointError.

derandomize=True: the same cases every run, so CI is stable; the counts are in FUZZ (tests/safetensors_fuzz.py).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors_fuzz import flip_bytes, fuzz_settings, parse, resized, retyped, serialize, with_header

import svdquant
from svdquant.checkpoint import META_FILE, TENSOR_FILE, CheckpointError, NonFiniteWarning

# per test; 10 tests -> 4000 cases. SVDQUANT_FUZZ_EXAMPLES=N runs N each (a longer local campaign, or a quick look)
FUZZ = fuzz_settings(400)


# ------------------------------------------------------------------------------------------------ the checkpoint
class Original:
    """The saved checkpoint's bytes, its parsed header and the folder each case is written to."""

    def __init__(self, root: Path):
        model = tm.build_flux()
        svdquant.quantize(model, svdquant.get_recipe("int4", iterations=1, eval_tokens=64),
                          svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 1)), progress=False)
        self.saved = svdquant.save_quantized(model, root / "orig")
        self.tensor_bytes = (self.saved / TENSOR_FILE).read_bytes()
        self.meta_text = (self.saved / META_FILE).read_text()
        self.header, self.metadata, self.entries = parse(self.tensor_bytes)
        self.names = sorted(self.entries)
        self.quantized = {k for k in self.names if k.rpartition(".")[0] in json.loads(self.meta_text)["layers"]}
        self.case = root / "case"
        self.case.mkdir()
        self.inputs = tm.calibration_inputs("flux", model, 1, seed=7)[0]


@pytest.fixture(scope="module")
def orig(tmp_path_factory):
    return Original(tmp_path_factory.mktemp("fuzz"))


def load(orig: Original, tensor_bytes: bytes | None = None, meta_text: str | None = None, verify: bool = False):
    """Write the case and load it: ``("ok", model)``, ``("error", CheckpointError)`` or ``("warned", model)``.
    Anything else raises, which fails the test. Unverified by default: the SHA-256 in svdquant.json would refuse
    every changed tensor file at once, while a hostile author writes matching hashes; the checks behind it are
    what these cases test."""
    (orig.case / TENSOR_FILE).write_bytes(orig.tensor_bytes if tensor_bytes is None else tensor_bytes)
    (orig.case / META_FILE).write_text(orig.meta_text if meta_text is None else meta_text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = svdquant.load_quantized(orig.case, verify=verify)
        except CheckpointError as e:
            return "error", e
    if any(issubclass(w.category, NonFiniteWarning) for w in caught):
        return "warned", model
    return "ok", model


def test_the_original_loads(orig):
    assert load(orig)[0] == "ok"
    assert load(orig, serialize(orig.entries, orig.metadata))[0] == "ok"  # the serializer itself is faithful


# ------------------------------------------------------------------------------------------------ the tensor file
@FUZZ
@given(data=st.data())
def test_truncated_file(orig, data):
    n = data.draw(st.integers(0, len(orig.tensor_bytes) - 1))
    assert load(orig, orig.tensor_bytes[:n])[0] == "error"


@FUZZ
@given(data=st.data())
def test_flipped_bytes(orig, data):
    """Flips anywhere (mostly in the header, where they do the most harm): a model or a CheckpointError."""
    load(orig, flip_bytes(orig.tensor_bytes, data))


@FUZZ
@given(data=st.data())
def test_header_lies(orig, data):
    """One tensor's dtype, shape or offsets replaced by a wrong (or absurd) value; the data unchanged."""
    name = data.draw(st.sampled_from(orig.names))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra-key", "not-a-dict"]))
    header = json.loads(json.dumps(orig.header))
    junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=5),
                     st.integers(-2**70, 2**70), st.lists(st.integers(-2**70, 2**70), max_size=9))
    if field == "dtype":
        new = data.draw(st.one_of(st.sampled_from(["F32", "F16", "BF16", "U8", "I8", "I32", "I64", "F64", "BOOL",
                                                   "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "X"]), junk))
    elif field == "shape":
        new = data.draw(st.one_of(st.lists(st.integers(0, 300), max_size=4), junk))
    elif field == "data_offsets":
        size = len(orig.tensor_bytes)
        new = data.draw(st.one_of(st.lists(st.integers(-1, size), min_size=2, max_size=2), junk))
    else:
        new = None
    if field == "extra-key":
        header[name]["extra"] = 1
    elif field == "not-a-dict":
        header[name] = data.draw(junk)
    else:
        header[name][field] = new
    changed = header != orig.header
    result = load(orig, with_header(orig.tensor_bytes, {**header, "__metadata__": orig.metadata}))
    assert result[0] == "error" or not changed


@FUZZ
@given(length=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 4096), st.sampled_from([2**64 - 1, 2**63, 2**32])))
def test_header_length_lies(orig, length):
    n = int.from_bytes(orig.tensor_bytes[:8], "little")
    result = load(orig, length.to_bytes(8, "little") + orig.tensor_bytes[8:])
    assert result[0] == "error" or length == n


@FUZZ
@given(data=st.data())
def test_malformed_headers(orig, data):
    """Headers that are not a safetensors header at all: junk bytes, other JSON, deep nesting, duplicates."""
    kind = data.draw(st.sampled_from(["bytes", "json", "deep", "duplicate", "metadata"]))
    if kind == "bytes":
        h = data.draw(st.binary(max_size=200))
    elif kind == "json":
        h = json.dumps(data.draw(st.recursive(
            st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4)),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
            max_leaves=20))).encode()
    elif kind == "deep":
        depth = data.draw(st.integers(100, 100_000))
        h = b"[" * depth + b"]" * depth
    elif kind == "duplicate":
        name = data.draw(st.sampled_from(orig.names))
        one = json.dumps({name: orig.header[name]})[1:-1]
        h = ("{" + one + ", " + json.dumps({**orig.header, "__metadata__": orig.metadata})[1:]).encode()
    else:
        meta = data.draw(st.one_of(st.integers(), st.lists(st.text(max_size=3), max_size=3),
                                   st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=3)))
        h = json.dumps({**orig.header, "__metadata__": meta}).encode()
    assert load(orig, with_header(orig.tensor_bytes, h))[0] == "error"


@FUZZ
@given(data=st.data())
def test_missing_extra_and_resized_tensors(orig, data):
    """Well-formed files that hold other tensors than the model: one missing, one extra, or one with a
    wrong (e.g. packed) size or dtype, its bytes consistent with the header."""
    entries = dict(orig.entries)
    name = data.draw(st.sampled_from(orig.names))
    kind = data.draw(st.sampled_from(["missing", "extra", "resized", "retyped"]))
    if kind == "missing":
        del entries[name]
    elif kind == "extra":
        extra = data.draw(st.one_of(st.sampled_from([n + "x" for n in orig.names]), st.text(min_size=1, max_size=8)))
        if extra in entries:
            return
        entries[extra] = ("F32", [2], bytes(8))
    elif kind == "resized":
        new = data.draw(st.lists(st.integers(0, 70), min_size=0, max_size=3))
        if new == entries[name][1]:
            return
        entries[name] = resized(entries[name], new)
    else:
        dtype = entries[name][0]
        new = data.draw(st.sampled_from(["F32", "F16", "BF16", "U8", "I8", "I32", "F8_E4M3"]))
        floats = {"F32", "F16", "BF16"}
        if new == dtype or (new in floats and dtype in floats and name not in orig.quantized):
            return  # a kept layer may be stored in any float dtype: not damage
        entries[name] = retyped(entries[name], new)
    assert load(orig, serialize(dict(sorted(entries.items())), orig.metadata))[0] == "error"


@FUZZ
@given(data=st.data())
def test_non_finite_values(orig, data):
    """NaN / Inf written into a floating tensor: a CheckpointError in a quantized layer (svdquant never
    writes them there), a NonFiniteWarning in a kept 16-bit layer (the base model's own weights)."""
    floats = [k for k in orig.names if orig.entries[k][0] == "F32" and orig.entries[k][1] != [0]]
    name = data.draw(st.sampled_from(floats))
    dtype, shape, raw = orig.entries[name]
    t = torch.frombuffer(bytearray(raw), dtype=torch.float32).clone()
    if t.numel() == 0:
        return
    t[data.draw(st.integers(0, t.numel() - 1))] = data.draw(st.sampled_from([float("nan"), float("inf"),
                                                                              float("-inf")]))
    entries = {**orig.entries, name: (dtype, shape, t.numpy().tobytes())}
    result = load(orig, serialize(entries, orig.metadata))[0]
    assert result == ("error" if name in orig.quantized else "warned")


@FUZZ
@given(data=st.data())
def test_impossible_codes(orig, data):
    """One byte of a two-level (int4m) layer's codes or multipliers set to any value: the file stays well formed,
    and it loads exactly when the value is one the quantizer can write (codes in [-7, 7], so no nibble 8;
    multipliers in [1, 18]), since the INT8 kernels would overflow on the others."""
    two_level = [k.removesuffix("wmult") for k in orig.names if k.endswith(".wmult")]
    assert two_level  # the int4 recipe's W4A8 layers
    qnames = [p + b for p in two_level for b in ("qweight", "wmult")]
    name = data.draw(st.sampled_from(qnames))
    dtype, shape, raw = orig.entries[name]
    raw = bytearray(raw)
    value = data.draw(st.integers(0, 255))
    raw[data.draw(st.integers(0, len(raw) - 1))] = value
    if name.endswith(".wmult"):
        fine = 1 <= value <= 18
    else:
        fine = (value & 0x0F) != 8 and (value >> 4) != 8
    result = load(orig, serialize({**orig.entries, name: (dtype, shape, bytes(raw))}, orig.metadata))
    assert result[0] == ("ok" if fine else "error"), result


@fuzz_settings(300, divide=3)
@given(data=st.data())
def test_what_loads_without_a_warning_runs_finite(orig, data):
    """Bits flipped in the values of floating tensors (exponent bytes mostly: huge but finite numbers, as a disk
    or a download flips them), loaded unverified: what loads without a NonFiniteWarning must run a forward pass
    to a finite output (before the range checks, 29 of 300 such files loaded silently and gave NaN), and the
    SHA-256 refuses every one of them when verified."""
    floats = [k for k in orig.names if orig.entries[k][0] == "F32" and orig.entries[k][2]]
    entries = dict(orig.entries)
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(floats))
        dtype, shape, raw = entries[name]
        raw = bytearray(raw)
        i = data.draw(st.integers(0, len(raw) // 4 - 1))
        byte = data.draw(st.one_of(st.just(3), st.integers(0, 3)))  # 3: sign and exponent (little-endian)
        raw[4 * i + byte] ^= data.draw(st.integers(1, 255))
        entries[name] = (dtype, shape, bytes(raw))
    tensor_bytes = serialize(entries, orig.metadata)
    kind, model = load(orig, tensor_bytes)
    if kind == "ok":
        with torch.no_grad():
            out = model(**orig.inputs)[0]
        assert torch.isfinite(out).all(), [k for k in entries if entries[k] != orig.entries[k]]
    if entries != orig.entries:
        assert load(orig, tensor_bytes, verify=True)[0] == "error"


# ------------------------------------------------------------------------------------------------ svdquant.json
def _paths(value, prefix=()):
    """Every (path, value) inside a JSON document."""
    yield prefix, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


@FUZZ
@given(data=st.data())
def test_metadata_lies(orig, data):
    """One value anywhere in svdquant.json replaced (sizes, formats, class, layer names...), or the text
    cut or flipped: a model or a CheckpointError, and never a build of an absurd model."""
    kind = data.draw(st.sampled_from(["replace", "replace", "replace", "cut", "flip"]))
    text = orig.meta_text
    if kind == "cut":
        text = text[:data.draw(st.integers(0, len(text) - 1))]
    elif kind == "flip":
        raw = bytearray(text.encode())
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 127))
        text = raw.decode("utf-8", "replace")
    else:
        meta = json.loads(text)
        paths = [p for p, _ in _paths(meta) if p and p[0] in ("model_class", "model_config", "layers",
                                                               "format_version", "recipe", "base")]
        path = data.draw(st.sampled_from(paths))
        new = data.draw(st.one_of(
            st.none(), st.booleans(), st.integers(-5, 300), st.sampled_from([2**24 + 1, 10**9, 2**63, 10**400]),
            st.floats(allow_nan=True), st.text(max_size=6),
            st.sampled_from(["int4m", "nvfp4", "int8", "fp8", "nf4", "bfloat16", "nn", "linear", "conv1x1",
                             "SD3Transformer2DModel", "DiffusionPipeline", "ModelMixin", "__class__"]),
            st.lists(st.integers(0, 10**6), max_size=3), st.just([0] * 5000), st.dictionaries(st.text(max_size=3),
                                                                                           st.integers(), max_size=2)))
        owner = meta
        for p in path[:-1]:
            owner = owner[p]
        owner[path[-1]] = new
        if path[0] == "layers" and len(path) == 1:
            return
        text = json.dumps(meta)
    load(orig, meta_text=text)


@FUZZ
@given(data=st.data())
def test_metadata_layer_names_lie(orig, data):
    """A quantized layer renamed to another module (a norm, a block, a missing name, a buffer)."""
    meta = json.loads(orig.meta_text)
    old = data.draw(st.sampled_from(sorted(meta["layers"])))
    modules = sorted({k.rpartition(".")[0] for k in orig.names} | {""})
    new = data.draw(st.one_of(st.sampled_from(modules), st.text(max_size=12),
                              st.sampled_from([old + ".qweight", old + ".lora_down", "transformer_blocks",
                                               "norm_out", "x_embedder"])))
    if new == old or new in meta["layers"]:
        return
    meta["layers"][new] = meta["layers"].pop(old)
    assert load(orig, meta_text=json.dumps(meta))[0] == "error"


# ------------------------------------------------------------------------------------------------ fixed cases
@pytest.mark.parametrize("new", ["__len__", "config", "dtype", "norm_out.norm", "forward"])
def test_layer_named_after_a_non_module_attribute(orig, new):
    """Names that getattr answers without a module (diffusers' config lookup raised KeyError for ``__len__``)."""
    meta = json.loads(orig.meta_text)
    old = sorted(meta["layers"])[0]
    meta["layers"][new] = meta["layers"].pop(old)
    assert load(orig, meta_text=json.dumps(meta))[0] == "error"


def test_huge_header_length_is_not_read(orig):
    """A header length above MAX_HEADER_BYTES in a file that is really that long: refused before reading it."""
    from svdquant.checkpoint import MAX_HEADER_BYTES

    n = MAX_HEADER_BYTES + 8
    f = orig.case / TENSOR_FILE
    with open(f, "wb") as h:
        h.write(n.to_bytes(8, "little"))
        h.truncate(8 + n)  # sparse: no disk used
    (orig.case / META_FILE).write_text(orig.meta_text)
    with pytest.raises(CheckpointError, match="headers of up to"):
        svdquant.load_quantized(orig.case)


def test_huge_metadata_file_is_not_read(orig):
    from svdquant.checkpoint import MAX_METADATA_BYTES

    (orig.case / TENSOR_FILE).write_bytes(orig.tensor_bytes)
    with open(orig.case / META_FILE, "wb") as h:
        h.truncate(MAX_METADATA_BYTES + 1)
    with pytest.raises(CheckpointError, match="never over"):
        svdquant.load_quantized(orig.case)


def test_layer_count_above_the_tensor_count_is_refused_before_building(orig):
    meta = json.loads(orig.meta_text)
    meta["model_config"]["num_single_layers"] = 1_000_000
    kind, err = load(orig, meta_text=json.dumps(meta))
    assert kind == "error" and "holds only" in str(err)


def test_a_header_of_many_entries_is_refused_before_it_is_parsed(orig):
    """600,000 empty entries (22 MB): counted in the unparsed text and refused at once (the hard cap: before the
    config builds a model). Parsing it first took seconds and hundreds of MB."""
    import time
    import tracemalloc

    h = ("{" + ",".join(f'"tensor_with_a_long_name_{i:07d}":{{}}' for i in range(600_000)) + "}").encode()
    (orig.case / META_FILE).write_text(orig.meta_text)
    (orig.case / TENSOR_FILE).write_bytes(len(h).to_bytes(8, "little") + h)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="more than a safetensors header of at most 100000 tensors"):
        svdquant.load_quantized(orig.case)
    took, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert took < 2 and peak < 3 * len(h), (took, peak)


@pytest.mark.parametrize("kind", ["entries", "commas"])
def test_a_well_formed_header_over_the_models_bound_is_refused_unparsed(orig, kind):
    """Valid-looking entries, three times as many as the model has; or one shape of a million dimensions: refused
    at the bound the model built from the config sets (the message comes from the count, before any parse)."""
    if kind == "entries":
        entries = {f"t{i}": ("F32", [1], bytes(4)) for i in range(3 * len(orig.names))}
    else:
        entries = {**orig.entries, orig.names[0]: ("U8", [1] * 1_000_000, bytes(1))}
    (orig.case / META_FILE).write_text(orig.meta_text)
    (orig.case / TENSOR_FILE).write_bytes(serialize(entries, orig.metadata))
    with pytest.raises(CheckpointError, match=f"more than a safetensors header of at most {len(orig.names)} tensors"):
        svdquant.load_quantized(orig.case)
