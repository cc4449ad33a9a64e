"""Several groups of a block quantized at once (``quantize(workers=)``, :mod:`svdquant.quantize.concurrent`).

On the CPU the workers are plain threads (no CUDA streams): the result must equal the one-at-a-time result bit
for bit, since each group's quantizer reads only its own inputs and weights. Also: a stack's first block runs
one group at a time (it compiles the search's Triton kernels once on a GPU), a failing group ends the call
with no worker left, a group out of GPU memory beside the others runs again alone, and ``workers=`` is
checked. On a GPU (``-m gpu``): the same equality with streams.
"""

from __future__ import annotations

import copy
import threading

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch

import svdquant
from svdquant.quantize import blocks as quantize_blocks
from svdquant.quantize.concurrent import DEFAULT_GPU_WORKERS, GroupWorkers, default_workers

RECIPE = svdquant.Int4Config(iterations=3, eval_tokens=128)
DTYPE = torch.bfloat16
CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def flux():
    model = tm.build_flux(seed=0, dtype=DTYPE, num_layers=2, num_single_layers=2)
    return model, svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 2))


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def record_threads(monkeypatch):
    """The list of (block, thread name) of every group's quantizer call, and the spy (its .model: where blocks are named)."""
    seen = []
    solve = quantize_blocks.solve_group

    def spy(root, group, *a, **k):
        block = next(n for n, m in spy.model.named_modules() if m is root)
        seen.append((block, threading.current_thread().name))
        return solve(root, group, *a, **k)

    monkeypatch.setattr(quantize_blocks, "solve_group", spy)
    return seen, spy


def test_groups_at_once_equal_one_at_a_time(monkeypatch):
    model, calib = flux()
    seq, par = copy.deepcopy(model), copy.deepcopy(model)
    r0 = svdquant.quantize(seq, RECIPE, calib, progress=False, workers=1)
    seen, spy = record_threads(monkeypatch)
    spy.model = par
    r1 = svdquant.quantize(par, RECIPE, calib, progress=False, workers=3)
    assert same_state(seq, par)
    assert [(r.names, r.rel_error) for r in r0.rows] == [(r.names, r.rel_error) for r in r1.rows]
    # the first block of each stack one group at a time, in the caller's thread; the others in the workers
    first = {"transformer_blocks.0", "single_transformer_blocks.0"}
    assert {b for b, t in seen if t == threading.current_thread().name} == first
    assert {b for b, t in seen if t.startswith("svdquant-group")} == {"transformer_blocks.1",
                                                                      "single_transformer_blocks.1"}
    assert "groups at once (wall)" in r1.stages and "groups at once (wall)" not in r0.stages
    assert "add up the groups quantized at once" in str(r1)
    assert not [t for t in threading.enumerate() if t.name.startswith("svdquant-group")]


def test_a_failing_group_ends_the_call_cancels_the_queued_ones_and_leaves_no_worker(monkeypatch):
    model, calib = flux()
    solve = quantize_blocks.solve_group
    block = model.transformer_blocks[1]
    ran = []

    def boom(root, group, *a, **k):
        if root is block:
            ran.append(group.names)
            if len(ran) == 1:
                raise RuntimeError("search failed")
        return solve(root, group, *a, **k)

    monkeypatch.setattr(quantize_blocks, "solve_group", boom)
    with pytest.raises(RuntimeError, match="search failed"):
        svdquant.quantize(model, RECIPE, calib, progress=False, workers=2)
    n_groups = len(svdquant.models.get_adapter(model).groups(block))
    assert n_groups >= 8 and 1 <= len(ran) < n_groups  # the groups not yet started were cancelled
    assert not [t for t in threading.enumerate() if t.name.startswith(("svdquant-group", "svdquant-replay"))]


def test_overlapped_blocks_equal_one_at_a_time(monkeypatch):
    """``OVERLAP_BLOCKS``: a block's groups are queued before the previous block's are landed (modules built and
    swapped in); a stack's first block runs alone (the block before it landed first); the model is bit for bit
    the one-at-a-time one."""
    model = tm.build_flux(seed=0, dtype=DTYPE, num_layers=3, num_single_layers=3)
    calib = svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 2))
    seq, par = copy.deepcopy(model), copy.deepcopy(model)
    svdquant.quantize(seq, RECIPE, calib, progress=False, workers=1)
    monkeypatch.setattr(quantize_blocks, "OVERLAP_BLOCKS", True)
    events = []
    submit, install = GroupWorkers.submit, quantize_blocks.install_group

    def spy_submit(self, tasks, *a, **k):
        events.append(("queued", tasks[0].args[1]))  # _solve_recorded(rec, block, ...)
        return submit(self, tasks, *a, **k)

    def spy_install(root, *a, **k):
        if not events or events[-1] != ("landed", root):
            events.append(("landed", root))
        return install(root, *a, **k)

    monkeypatch.setattr(GroupWorkers, "submit", spy_submit)
    monkeypatch.setattr(quantize_blocks, "install_group", spy_install)
    svdquant.quantize(par, RECIPE, calib, progress=False, workers=3)
    assert same_state(seq, par)
    name = {id(m): n for n, m in par.named_modules()}
    got = [f"{e} {name[id(b)].replace('transformer_blocks', 'T').replace('single_T', 'S')}" for e, b in events]
    assert got == ["queued T.0", "queued T.1", "landed T.0", "queued T.2", "landed T.1",  # T.2 beside T.1's tail
                   "landed T.2", "queued S.0", "queued S.1", "landed S.0", "queued S.2", "landed S.1", "landed S.2"]
    assert not [t for t in threading.enumerate() if t.name.startswith(("svdquant-group", "svdquant-replay"))]


def test_a_failing_group_with_blocks_overlapped_leaves_no_worker(monkeypatch):
    """A group fails while the next block's groups are queued behind it: the error reaches the caller, the next
    block's groups not started are cancelled, and no worker is left."""
    model = tm.build_flux(seed=0, dtype=DTYPE, num_layers=3, num_single_layers=1)
    calib = svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 2))
    monkeypatch.setattr(quantize_blocks, "OVERLAP_BLOCKS", True)
    solve, failing, queued = quantize_blocks.solve_group, model.transformer_blocks[1], model.transformer_blocks[2]
    ran = {id(failing): 0, id(queued): 0}

    def boom(root, group, *a, **k):
        if id(root) in ran:
            ran[id(root)] += 1
            if root is failing:
                raise RuntimeError("search failed")
        return solve(root, group, *a, **k)

    monkeypatch.setattr(quantize_blocks, "solve_group", boom)
    with pytest.raises(RuntimeError, match="search failed"):
        svdquant.quantize(model, RECIPE, calib, progress=False, workers=2)
    n_groups = len(svdquant.models.get_adapter(model).groups(queued))
    assert ran[id(failing)] >= 1 and ran[id(queued)] < n_groups  # (the failing block's may all have run: its
    # result is taken once the next block's replay is in)
    assert not [t for t in threading.enumerate() if t.name.startswith(("svdquant-group", "svdquant-replay"))]


def test_a_group_out_of_memory_beside_the_others_runs_again_alone():
    """GroupWorkers: the task that raised OutOfMemoryError in a worker runs again in the caller's thread after
    the others; the results come back in order and ``done`` is called once per task."""
    calls, done, done_in = [], [], set()

    def task(i, fail_once=[True]):
        def run():
            calls.append((i, threading.current_thread().name))
            if i == 1 and fail_once[0]:
                fail_once[0] = False
                raise torch.OutOfMemoryError("out of memory")
            return i * 10
        return run

    workers = GroupWorkers(torch.device("cpu"), 2)
    try:
        out, wall = workers.run([task(i) for i in range(4)],
                                lambda i: done.append(i) or done_in.add(threading.current_thread().name))
    finally:
        workers.close()
    assert out == [0, 10, 20, 30] and sorted(done) == [0, 1, 2, 3] and done[-1] == 1 and wall > 0
    assert calls[-1] == (1, threading.current_thread().name) and done_in == {threading.current_thread().name}
    assert sum(1 for i, _ in calls if i == 1) == 2


def test_groups_at_once_start_costliest_first():
    """GroupWorkers.run(costs=): the tasks go to the pool costliest first (the pool starts them in that order: a long
    group started last keeps the block waiting on it alone); the results still come back in the tasks' order."""
    costs = [1, 5, 3, 4, 2]
    tasks = [lambda i=i: i for i in range(5)]
    workers = GroupWorkers(torch.device("cpu"), 2)
    submitted, submit = [], workers._pool.submit
    workers._pool.submit = lambda fn, task, *a: submitted.append(tasks.index(task)) or submit(fn, task, *a)
    try:
        out, _ = workers.run(tasks, costs=costs)
    finally:
        workers.close()
    assert out == [0, 1, 2, 3, 4] and submitted == [1, 3, 2, 4, 0]


def test_a_blocks_groups_are_costed_by_their_shapes():
    """FLUX's double block (width 16 here): fc2 (the widest K, for GPTQ) and fc1 (the largest weights) before q/k/v,
    the out projections last."""
    import torch.nn as nn

    from svdquant import get_recipe
    from svdquant.models import Group
    from svdquant.quantize.blocks import _group_cost

    block = nn.Module()
    for name, (n, k) in dict(q=(16, 16), k=(16, 16), v=(16, 16), out=(16, 16), fc1=(64, 16), fc2=(16, 64)).items():
        setattr(block, name, nn.Linear(k, n))
    groups = [Group(("q", "k", "v")), Group(("out",)), Group(("fc1",)), Group(("fc2",)),
              Group(("ada",), weight_only=True)]
    block.ada = nn.Linear(16, 96)  # an adaLN modulation: wide, but neither searched nor refined
    costs = [_group_cost(block, g, get_recipe("int4")) for g in groups]
    assert sorted(range(5), key=lambda i: -costs[i]) == [3, 2, 0, 1, 4]
    costs = [_group_cost(block, g, get_recipe("int4", gptq=False)) for g in groups]  # no inverse factor: fc1 = fc2
    assert sorted(range(5), key=lambda i: -costs[i]) == [2, 3, 0, 1, 4]


def test_one_worker_runs_in_the_callers_thread():
    workers = GroupWorkers(torch.device("cpu"), 1)
    names = []
    out, wall = workers.run([lambda: names.append(threading.current_thread().name) or 5] * 2)
    assert out == [5, 5] and wall == 0.0 and set(names) == {threading.current_thread().name}


def test_default_workers():
    assert default_workers(torch.device("cpu")) == 1
    assert default_workers(torch.device("cuda", 0)) == DEFAULT_GPU_WORKERS > 1


@pytest.mark.parametrize("bad,error,message", [
    (0, ValueError, "workers= takes 1 or more groups quantized at once, got 0"),
    (-1, ValueError, "workers= takes 1 or more groups quantized at once, got -1"),
    (1.5, TypeError, "workers= takes a whole number of groups quantized at once, got 1.5"),
    (True, TypeError, "workers= takes a whole number of groups quantized at once, got True"),
    ("3", TypeError, "workers= takes a whole number of groups quantized at once, got '3'"),
])
def test_workers_is_checked_before_any_work(bad, error, message):
    model, calib = flux()
    with pytest.raises(error) as e:
        svdquant.quantize(model, RECIPE, calib, progress=False, workers=bad)
    assert str(e.value) == message
    assert not any(isinstance(m, svdquant.SVDQLinear) for m in model.modules())


def test_workers_takes_any_integer_type():
    import numpy as np

    model, calib = flux()
    r = svdquant.quantize(model, RECIPE, calib, progress=False, workers=np.int64(2))
    assert "groups at once (wall)" in r.stages


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_groups_at_once_equal_one_at_a_time():
    """On a GPU, workers on their own CUDA streams, streamed from the CPU under a cap: bit for bit the
    one-at-a-time result."""
    model, calib = flux()
    seq, par = copy.deepcopy(model), copy.deepcopy(model)
    svdquant.quantize(seq, RECIPE, calib, progress=False, device="cuda", workers=1)
    streams = []
    solve = quantize_blocks.solve_group

    def spy(*a, **k):
        streams.append(torch.cuda.current_stream().cuda_stream)
        return solve(*a, **k)

    quantize_blocks.solve_group = spy
    try:
        r = svdquant.quantize(par, RECIPE, calib, progress=False, device="cuda", max_gpu_memory="8GB")
    finally:
        quantize_blocks.solve_group = solve
    assert "groups at once (wall)" in r.stages
    default = torch.cuda.default_stream().cuda_stream
    assert len(set(streams) - {default}) == DEFAULT_GPU_WORKERS  # the first blocks on the caller's stream
    assert same_state(seq, par)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_overlapped_blocks_equal_one_at_a_time(monkeypatch):
    """``OVERLAP_BLOCKS`` on a GPU (workers on their streams, streamed under a cap, replays graphed): bit for bit
    the one-at-a-time result."""
    from svdquant.calibration import replay

    model = tm.build_flux(seed=0, dtype=DTYPE, num_layers=3, num_single_layers=3)
    calib = svdquant.Calibration(inputs=tm.calibration_inputs("flux", model, 2))
    seq, par = copy.deepcopy(model), copy.deepcopy(model)
    svdquant.quantize(seq, RECIPE, calib, progress=False, device="cuda", workers=1)
    monkeypatch.setattr(quantize_blocks, "OVERLAP_BLOCKS", True)
    monkeypatch.setattr(replay, "REPLAY_GRAPHS", True)
    svdquant.quantize(par, RECIPE, calib, progress=False, device="cuda", max_gpu_memory="8GB")
    assert same_state(seq, par)

