"""A denoiser's forward replayed from CUDA graphs, one per call signature (``svdquant.optimize``'s last step).

A diffusion pipeline calls its denoiser with the same shapes at every step, so the whole forward (the compiled
blocks, the embedders, the attention) is captured once in a CUDA graph and replayed: no kernel launch, Python
line or dynamo guard runs per step, which is what a FLUX.1-dev step lost to launch overhead (BENCHMARKS.md).

* The signature of a call: every tensor argument's shape, dtype and device, and every other argument's value
  (``return_dict``, ``joint_attention_kwargs``...). A call with a new signature (another resolution or batch size)
  is captured on first use; the :data:`DEFAULT_GRAPHS` most recent signatures are kept (least recently used
  dropped). Tensor arguments are copied into the graph's static inputs; outputs are copied out, so a pipeline
  that calls the model twice per step (true CFG) keeps both results.
* What a graph bakes in and how it stays right: the weights' memory (a LoRA strength change rewrites the branch
  in place, so graphs stay valid at no cost), and everything else the layers run (a LoRA added or removed, a weight
  mode change, :func:`svdquant.fuse`): those bump :func:`svdquant.modules.revision`, and the next call drops every
  graph and captures again.
* Calls that cannot replay run the forward as it is: gradients enabled, tensors off CUDA, arguments that are not
  plain values (no signature), or while the model is offloaded by hooks (its weights would move).
* A forward that does what a capture cannot hold for some inputs (Qwen-Image's transformer, given a text mask
  with padding, copies a host scalar to the GPU) fails its capture: that signature then runs as it is (still
  compiled), once warned, and is not captured again; the other signatures keep their graphs. After
  :data:`MAX_FAILED_CAPTURES` such signatures, new ones run without a try. A model with graphs refuses
  ``copy.deepcopy`` in one line (its graphs and hooks belong to it): copy it before ``optimize``, or ``deoptimize``.

Sharing one memory pool is safe because graphs are never replayed concurrently and every graph's static inputs
and outputs stay referenced (PyTorch's CUDA graph notes: "sharing memory across captures").
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable

import torch

from ..modules import SVDQLinear, pending_branches, revision

DEFAULT_GRAPHS = 4
# after this many call signatures failed their capture, new signatures run without trying (a capture costs two
# warm-up forwards first; Qwen-Image fails one per padded text length)
MAX_FAILED_CAPTURES = 2
WARMUP_CALLS = 2  # before a capture, on a side stream: compiles the blocks for the shape, settles cuBLAS/cuDNN


class _Unsupported(Exception):
    pass


def signature(value) -> Any:
    """A hashable key for an argument structure: tensors by (shape, dtype, device), plain values by value.
    Raises ``_Unsupported`` for what a graph cannot hold (a CPU tensor, a tensor needing grad, other objects)."""
    if torch.is_tensor(value):
        if value.device.type != "cuda" or value.requires_grad:
            raise _Unsupported
        return ("T", tuple(value.shape), value.dtype, value.device.index)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(signature(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, signature(v)) for k, v in value.items())))
    raise _Unsupported


def _is_output(value) -> bool:
    """diffusers' ``BaseOutput`` (a dataclass that is also an OrderedDict): rebuilt as its own type, by field."""
    return isinstance(value, dict) and hasattr(value, "to_tuple")


def _tensors(value, out: list) -> list:
    """The tensors of an argument or output structure, in the order :func:`_rebuild` puts them back."""
    if torch.is_tensor(value):
        out.append(value)
    elif _is_output(value):
        for k in value.keys():
            _tensors(value[k], out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _tensors(v, out)
    elif isinstance(value, dict):
        for k in sorted(value):
            _tensors(value[k], out)
    return out


def _rebuild(value, tensors):
    """``value`` with its tensors replaced, in :func:`_tensors`' order, from the iterator ``tensors``."""
    if torch.is_tensor(value):
        return next(tensors)
    if _is_output(value):
        return type(value)(**{k: _rebuild(value[k], tensors) for k in value.keys()})
    if isinstance(value, (list, tuple)):
        items = [_rebuild(v, tensors) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {k: _rebuild(value[k], tensors) for k in sorted(value)}
    return value


class _Graph:
    def __init__(self, graph, static_args, static_kwargs, static_out):
        self.graph, self.args, self.kwargs, self.out = graph, static_args, static_kwargs, static_out
        self.inputs = _tensors((static_args, static_kwargs), [])


class StepGraphs:
    """The callable that replaces a denoiser's ``forward`` (see the module doc). ``model.forward`` is restored by
    :meth:`remove`; ``captures`` counts the graphs captured so far (a re-capture after a change included)."""

    def __init__(self, model: torch.nn.Module, forward: Callable, max_graphs: int = DEFAULT_GRAPHS,
                 bypass: Callable[[], bool] = lambda: False, prepare: Callable | None = None):
        if max_graphs < 1:
            raise ValueError(f"max_graphs={max_graphs}: keep at least one graph")
        # bypass(): True when a call must run the forward as it is (hooks that move weights or skip blocks);
        # prepare(args, kwargs): once, before the first capture (svdquant.optimize's layer choice)
        self.model, self.forward, self.max_graphs, self.bypass = model, forward, max_graphs, bypass
        self.prepare = prepare
        self.graphs: OrderedDict[Any, _Graph] = OrderedDict()
        self.pool = None
        self.revision, self.pending = revision(), pending_branches()
        self.captures = 0
        self.replays = 0
        self.uncapturable: dict[Any, str] = {}  # signature -> why its capture failed (those run as they are)

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled() or self.bypass():
            return self.forward(*args, **kwargs)
        try:
            key = signature((args, kwargs))
        except _Unsupported:
            return self.forward(*args, **kwargs)
        if self.pending != pending_branches():  # LoRA changes wait for each layer's next forward, which a replay skips
            self.pending = pending_branches()
            for m in self.model.modules():
                if isinstance(m, SVDQLinear):
                    m._apply_stale_branch()  # a strength change rewrites in place; a new LoRA bumps the revision
        if self.revision != revision():  # the layers changed what they run: every graph is stale
            self._restart()
        if self.prepare is not None:
            prepare, self.prepare = self.prepare, None
            prepare(args, kwargs)
            self._restart()
        entry = self.graphs.get(key)
        if entry is None and (key in self.uncapturable or len(self.uncapturable) >= MAX_FAILED_CAPTURES):
            return self.forward(*args, **kwargs)
        if entry is None:
            failed = None
            try:
                entry = self._capture(args, kwargs)
                if self.revision != revision():  # the capture itself rebuilt a layer (first call after a move)
                    self._restart()
                    entry = self._capture(args, kwargs)
            except RuntimeError as e:
                if "captur" not in str(e).lower():
                    raise
                failed = str(e).splitlines()[0]
            if failed is not None:  # outside the handler: the failed capture's memory goes with the exception
                self._uncapturable(key, failed)
                return self.forward(*args, **kwargs)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
            for dst, src in zip(entry.inputs, _tensors((args, kwargs), [])):
                dst.copy_(src)
        entry.graph.replay()
        self.replays += 1
        return _rebuild(entry.out, iter([t.clone() for t in _tensors(entry.out, [])]))

    def _uncapturable(self, key, why: str) -> None:
        """Remember that ``key``'s forward cannot be captured (its calls then run as they are)."""
        if not self.uncapturable:
            warnings.warn(f"svdquant.optimize: a {type(self.model).__name__} call of these inputs cannot be captured "
                          f"in a CUDA graph ({why}); such calls run without one", stacklevel=3)
        self.uncapturable[key] = why

    def __deepcopy__(self, memo):
        raise TypeError("a model svdquant.optimize made CUDA graphs for cannot be deep-copied (its graphs belong to "
                        "this model): copy it before optimize, or call svdquant.deoptimize(model) first")

    def _capture(self, args, kwargs) -> _Graph:
        stream = torch.cuda.current_stream()
        try:
            return self._capture_on(args, kwargs)
        except BaseException:
            # A failed capture leaves torch.cuda.graph's capture stream current (its exit raises before it restores
            # the caller's), and a pool with no graph in it, which the caching allocator refuses to capture into.
            torch.cuda.set_stream(stream)
            if not self.graphs:
                self.pool = None
            raise

    def _capture_on(self, args, kwargs) -> _Graph:
        src = _tensors((args, kwargs), [])
        static = iter([t.clone() for t in src])
        static_args, static_kwargs = _rebuild((args, kwargs), static)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.forward(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.forward(*static_args, **static_kwargs)
        self.captures += 1
        return _Graph(graph, static_args, static_kwargs, out)

    def clear(self) -> None:
        """Drop every graph (the next call captures again). The memory pool goes with them: the caching allocator
        refuses a capture into a pool whose graphs are all gone (an internal assert in PyTorch 2.11)."""
        self.graphs.clear()
        self.uncapturable.clear()  # the layers may run otherwise now
        self.pool = None

    def _restart(self) -> None:
        """Drop every graph and take the layers' current revision as the one the next captures see."""
        self.clear()
        self.revision = revision()

    def remove(self) -> None:
        """Give the model its forward back."""
        self.clear()
        if self.model.__dict__.get("forward") is self:
            del self.model.__dict__["forward"]
