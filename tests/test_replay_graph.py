"""A block's replayed calls launched as one captured CUDA graph (svdquant/calibration/replay_graph.py).

On the CPU, where torch has no graphs, ``rerun_capture`` stands in for the capture: each launch runs the captured
call again, through the same static arguments, static recorder buffers and static outputs a CUDA graph would use.
That checks everything around the graph (what is copied in, what each launch records, what is cloned out, when a
call runs eagerly instead); the GPU tests at the end check the graph itself, bit for bit against eager replays.
"""

from __future__ import annotations

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
from torch.utils import _pytree as pytree

import svdquant
from svdquant import get_recipe
from svdquant.calibration import replay, replay_graph
from svdquant.calibration.capture import LinearInputRecorder
from svdquant.calibration.replay_graph import GraphedCalls, NotCapturable, StaticRecords

CUDA = torch.cuda.is_available()


def rerun_capture(fn):
    """A graph's semantics without a GPU: the outputs of a first run are the static outputs, and every launch
    runs ``fn`` again and writes its outputs into them."""
    out = fn()

    def launch():
        for dst, src in zip(pytree.tree_leaves(out), pytree.tree_leaves(fn())):
            dst.copy_(src)
    return out, launch


def _block_and_entries(n=6, seed=100):
    """The tiny FLUX's first double block and ``n`` of its recorded entries (one image each)."""
    torch.manual_seed(0)
    model = tm.build_flux()
    entries = []
    block = model.transformer_blocks[0]
    h = block.register_forward_pre_hook(lambda m, a, kw: entries.append(dict(kw)), with_kwargs=True)
    with torch.no_grad():
        for x in tm.calibration_inputs("flux", model, n, seed=seed):
            model(**x)
    h.remove()
    return block, entries


def _replayed(block, entries, capture, tokens=16):
    """(outputs, recorder, GraphedCalls or None) of replaying ``entries`` through ``block``."""
    firsts = {n: m for n, m in block.named_modules() if n in ("attn.to_q", "attn.add_q_proj", "ff.net.2",
                                                               "ff_context.net.2", "attn.to_out.0")}
    rec = LinearInputRecorder(firsts, len(entries), tokens, seed=3)
    graphed = GraphedCalls(block, rec, capture) if capture is not None else None
    outs = []
    try:
        with torch.no_grad():
            for e in entries:
                outs.append(graphed(e) if graphed is not None else block(**e))
    finally:
        if graphed is not None:
            graphed.close()
        rec.close()
    return outs, rec, graphed


def _same_records(a: LinearInputRecorder, b: LinearInputRecorder):
    assert a.calls == b.calls and a.amax.keys() == b.amax.keys()
    for k in a.amax:
        assert torch.equal(a.amax[k], b.amax[k]), k
        assert len(a.samples[k]) == len(b.samples[k]) and all(
            torch.equal(x, y) for x, y in zip(a.samples[k], b.samples[k])), k


def test_graphed_calls_record_and_return_what_eager_calls_do():
    block, entries = _block_and_entries()
    want, ref, _ = _replayed(block, entries, None)
    got, rec, graphed = _replayed(block, entries, rerun_capture)
    assert graphed.failure is None and graphed.launches == len(entries) - 1 == graphed.calls - 1  # 1st: warm-up
    for a, b in zip(got, want):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(c == len(entries) for c in rec.calls.values())
    _same_records(rec, ref)


def test_outputs_are_the_callers_not_the_graphs():
    """Each launch's outputs are copies: the next launch overwrites the static outputs, not what was returned."""
    block, entries = _block_and_entries(4)
    got, _, _ = _replayed(block, entries, rerun_capture)
    want, _, _ = _replayed(block, entries, None)
    assert got[1][0].data_ptr() != got[2][0].data_ptr()
    assert all(torch.equal(x, y) for a, b in zip(got, want) for x, y in zip(a, b))


def test_a_call_of_another_shape_runs_eagerly_in_order():
    """A call whose tensors differ in shape (another token count) from the captured one runs eagerly, and the
    records stay in call order."""
    block, entries = _block_and_entries(5)
    short = {**entries[3], "encoder_hidden_states": entries[3]["encoder_hidden_states"][:, :4].clone()}
    txt_rope = tuple(r[entries[3]["encoder_hidden_states"].shape[1] - 4:] for r in entries[3]["image_rotary_emb"])
    short["image_rotary_emb"] = txt_rope
    calls = entries[:3] + [short] + entries[4:]
    want, ref, _ = _replayed(block, calls, None)
    got, rec, graphed = _replayed(block, calls, rerun_capture)
    assert graphed.launches == 3 and graphed.calls == 5  # the warm-up and the short call ran eagerly
    assert all(torch.equal(x, y) for a, b in zip(got, want) for x, y in zip(a, b))
    _same_records(rec, ref)


def test_a_capture_that_fails_leaves_the_block_eager():
    block, entries = _block_and_entries(4)

    def failing(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    want, ref, _ = _replayed(block, entries, None)
    got, rec, graphed = _replayed(block, entries, failing)
    assert graphed.launches == 0 and "not permitted" in graphed.failure
    assert all(torch.equal(x, y) for a, b in zip(got, want) for x, y in zip(a, b))
    _same_records(rec, ref)


def test_a_layer_called_twice_in_a_call_is_not_captured():
    """The static records hold one call of each layer: a block that calls a recorded layer twice replays eagerly."""
    rec = LinearInputRecorder({"l": torch.nn.Linear(4, 4)}, 2, 4, seed=0)
    rec.seen["l"] = (3, 4, torch.float32)
    records = StaticRecords(rec, torch.device("cpu"))
    records.begin()
    records.record("l", torch.randn(3, 4))
    with pytest.raises(NotCapturable, match="called twice"):
        records.record("l", torch.randn(3, 4))
    records.begin()
    with pytest.raises(NotCapturable, match="other tokens"):
        records.record("l", torch.randn(5, 4))
    records.begin()
    with pytest.raises(NotCapturable, match="not in the captured one"):
        records.check_captured()
    rec.close()


def test_replays_with_graphs_quantize_as_eager_replays(monkeypatch):
    """The whole quantizer on the tiny FLUX, replays graphed (through ``rerun_capture``) and eager: the same
    quantized model, bit for bit; every block's calls after the first launched."""
    def quantized(graphs):
        monkeypatch.setattr(replay.Replayer, "_graph_capture", (lambda self: rerun_capture) if graphs else
                            (lambda self: None))
        torch.manual_seed(0)
        model = tm.build_flux()
        svdquant.quantize(model, get_recipe("int4", iterations=2, eval_tokens=64),
                          svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 4)), progress=False)
        return model

    before = replay_graph.ReplayGraphStats(**{k: v for k, v in vars(replay_graph.TOTALS).items()
                                              if k != "failures"})
    graphed, eager = quantized(True), quantized(False)
    stats = replay_graph.TOTALS
    blocks = len(graphed.transformer_blocks) + len(graphed.single_transformer_blocks)
    assert stats.blocks - before.blocks == blocks and stats.captured - before.captured == blocks
    assert stats.launches - before.launches == 3 * blocks
    x = tm.flux_inputs(graphed, seed=5)
    assert torch.equal(tm.forward(graphed, x), tm.forward(eager, x))
    for (n, a), (_, b) in zip(graphed.state_dict().items(), eager.state_dict().items()):
        assert torch.equal(a, b), n


def test_graphs_are_off_by_default_and_only_on_a_gpu():
    assert replay.REPLAY_GRAPHS is False
    r = replay.Replayer(None, None, torch.device("cpu"), torch.device("cpu"), False, False, None, 16, 0)
    assert r._capture is None
    r.close()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_graphed_replays_are_bit_identical_to_eager():
    """A real CUDA graph, captured in a worker thread on a side stream while another thread launches matrix
    products on its own stream (as the search does): outputs and records bit for bit the eager replay's."""
    import threading

    block, entries = _block_and_entries(6)
    block = block.cuda()
    entries = [pytree.tree_map(lambda v: v.cuda() if torch.is_tensor(v) else v, e) for e in entries]
    want, ref, _ = _replayed(block, entries, None)
    side, stop = torch.cuda.Stream(), threading.Event()

    def busy():
        s = torch.cuda.Stream()
        a = torch.randn(512, 512, device="cuda")
        with torch.cuda.stream(s):
            while not stop.is_set():
                (a @ a).sum()
                s.synchronize()

    t = threading.Thread(target=busy)
    t.start()
    try:
        with torch.cuda.stream(side):
            got, rec, graphed = _replayed(block, entries, replay_graph.CudaCapture(side))
            side.synchronize()
    finally:
        stop.set()
        t.join()
    assert graphed.failure is None and graphed.launches == len(entries) - 1
    assert all(torch.equal(x, y) for a, b in zip(got, want) for x, y in zip(a, b))
    _same_records(rec, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_quantize_with_graphed_replays_equals_eager(monkeypatch):
    """The tiny FLUX quantized on the GPU with ``REPLAY_GRAPHS`` on and off: the same model, bit for bit."""
    def quantized(on):
        monkeypatch.setattr(replay, "REPLAY_GRAPHS", on)
        torch.manual_seed(0)
        model = tm.build_flux().cuda()
        svdquant.quantize(model, get_recipe("int4", iterations=2, eval_tokens=64),
                          svdquant.Calibration(inputs=[pytree.tree_map(lambda v: v.cuda() if torch.is_tensor(v)
                                                                       else v, x)
                                                       for x in tm.calibration_inputs("flux", model, 4)]),
                          progress=False)
        return model

    launches = replay_graph.TOTALS.launches
    graphed, eager = quantized(True), quantized(False)
    assert replay_graph.TOTALS.launches > launches, replay_graph.TOTALS.failures
    for (n, a), (_, b) in zip(graphed.state_dict().items(), eager.state_dict().items()):
        assert torch.equal(a, b), n
