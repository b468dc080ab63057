"""CUDA-graph replay of fixed-shape network calls inside a sampler loop.

Why: within one object every full-token SLaT pass has the same shapes, and every SS pass has the
same shapes always, so the kernels of one pass can be captured once as a CUDA graph and replayed
for the remaining steps: one launch per pass instead of ~2,000 kernel launches and their Python.
The values computed are the same kernels on the same inputs (replay re-runs the captured kernels).

What it buys depends on whether a pass is host-bound. Measured on the H100 (``full`` config, bf16,
``benchmarks/results/kernel_profile_h100``): a CFG-batched SLaT pass at N = 14k runs 41.5 ms of
kernels, so it is GPU-bound and gains nothing; the unguided batch-1 passes (21 ms of kernels, ~37 ms
wall) are host-bound and gain. Capturing then cost two extra eager passes per graph, so over a 25-step
object the SLaT stage got slower (1.23 vs 1.14 s). With the compiled SLaT torso (``compile_slat``) a
pass runs far fewer, faster kernels, so even the CFG-batched pass waits on the host (kernel profile:
26.5 ms of kernels in ~37 ms), and a capture now costs only its own host time (no extra eager pass
unless ``side_stream_warmup``). Whether it pays is measured by ``benchmarks/base_vs_official.py``
(variant ``compile-all-graphs``); the option stays off by default.

Requirements the callers meet: the captured function reads only its tensor arguments and tensors
that stay alive and unchanged for the graph's life (weights, the condition, its cached K/V, the
SLaT coordinate structure), and it runs no host synchronisation after its first (eager) call
(checked on the CPU by ``tests/test_cuda_graphs.py`` for the SLaT flow with a persistent structure).
"""
from __future__ import annotations

import contextlib
import threading
import warnings

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

Signature = tuple[tuple[tuple[int, ...], torch.dtype, torch.device], ...]


class GraphPool:
    """One CUDA-graph memory pool per device, shared by the graphs of several :class:`GraphedCall` objects and kept
    alive by this object, created on first use (so that CPU runs never touch CUDA).

    Safe for graphs that are replayed one at a time, in stream order on one stream, and whose static inputs and
    outputs stay referenced while they live (as :class:`GraphedCall` keeps them): a recording may then reuse only
    memory no live graph's static tensors hold, that is other recordings' temporaries (which each replay rewrites
    before it reads) and the memory of graphs already destroyed (whose replays, earlier on the stream, finish first).

    What it buys: the SLaT stage records two graphs per object. With a private pool each, every recording asks the
    allocator for fresh device memory (a ``cudaMalloc`` inside a recording was the longest idle stretch of one session-15
    profile), and the pools of finished objects stay cached until something empties the cache, which an asynchronous
    recording no longer does. With one kept pool, an object's second graph reuses the first one's temporaries, and the
    next object reuses this one's memory. The pool keeps its peak size (the largest object's graphs) while it lives.

    What keeps the pool alive is a one-kernel graph recorded into it on first use and held here, not a
    ``torch.cuda.MemPool``: on torch 2.11 + CUDA 13 (H100, session 16), a graph recorded into a kept ``MemPool`` and
    destroyed left the host caching allocator's entry for that pool at a use count of zero, and the next recording
    into the pool failed an internal assert (``it->second->use_count > 0``, CachingHostAllocator.h). A live graph
    holds the pool in both allocators, the mechanism torch's own pool sharing has always used."""

    def __init__(self) -> None:
        self._keepers: dict[int, Any] = {}  # device index -> the tiny graph whose life keeps the pool alive
        self._handles: dict[int, Any] = {}  # device index -> pool id for capture_begin / torch.cuda.graph

    def handle(self, device: torch.device | None = None):
        """The pool id for recordings on ``device`` (default: the current CUDA device)."""
        index = torch.cuda.current_device() if device is None or device.index is None else device.index
        if index not in self._handles:
            with torch.cuda.device(index):
                handle = torch.cuda.graph_pool_handle()
                seed = torch.zeros(1, device=f"cuda:{index}")
                seed + 1  # the kernel's first launch outside any capture (lazy module loading)
                keeper = torch.cuda.CUDAGraph()
                output = _record_without_sync(keeper, lambda t: t + 1, [seed], handle)
                self._keepers[index] = (keeper, seed, output)
                self._handles[index] = handle
        return self._handles[index]


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: list[Tensor]
    output: Any
    #: with ``in_pieces``: the pieces after ``graph`` (replayed in order after it)
    more: list = field(default_factory=list)
    #: whether the recording already ran the pieces on this call's inputs (``in_pieces`` with replay)
    ran: bool = False
    #: with ``in_pieces``: the pieces' memory pool (a merged recording reuses it), the calls that ran the pieces so
    #: far, and the pieces and their output once merged (kept referenced: one output-sized block, so that nothing
    #: recorded into the pool later can be handed memory a queued replay of them still writes; under the one-stream
    #: rule below that cannot happen anyway)
    pool: Any = None
    piece_calls: int = 0
    retired: list = field(default_factory=list)
    merge_failed: str = ""
    #: the stream every replay of this entry runs on: the pieces and a merged graph share a memory pool, which is safe
    #: only while their replays run in order on one stream (checked at each call)
    stream: Any = None

    def replay(self) -> None:
        self.graph.replay()
        for piece in self.more:
            piece.replay()


_PIECES = threading.local()  # .active: the _PieceRecording of this thread's recording in progress, if any


@torch.library.custom_op("fs3d::graph_piece_end", mutates_args=("x",))
def graph_piece_end(x: Tensor) -> None:
    """A point where a recording in pieces (``GraphedCall(in_pieces=True)``) ends one CUDA graph and starts the next;
    nothing anywhere else. ``x`` is the tensor the work before the point leaves for the work after it: declared
    mutated (it is not) so that torch.compile keeps the call in order among the kernels around it; the point itself
    may land anywhere between them, since the pieces replay in order. Why a custom op: a call inside a torch.compile'd
    function (the SLaT torso) that runs Python at run time, as the FA4 custom op does."""
    recording = getattr(_PIECES, "active", None)
    if recording is not None:
        recording.cut()


@graph_piece_end.register_fake
def _graph_piece_end_fake(x: Tensor) -> None:
    return None


class GraphedCall:
    """``fn(*tensors) -> tensor pytree``, replayed from one CUDA graph per input signature.

    The first ``warmup`` calls with a new signature run eagerly (they may build caches and
    synchronise); the next one captures the graph, then every call copies its arguments into the
    graph's static input buffers, replays, and returns a copy of the static outputs. Calls on a
    non-CUDA device always run eagerly, so the same code path works on the CPU. ``warmup=0`` records
    at the first call: only for a function whose caches are already built (nothing in it may read
    device data on the host or allocate lazily at first use).
    """

    def __init__(self, fn: Callable[..., Any], warmup: int = 1, side_stream_warmup: bool = False,
                 async_capture: bool = False, pool: GraphPool | None = None, in_pieces: bool = False,
                 merge_after: int = 0, merged_fn: Callable[..., Any] | None = None,
                 merged_warmup: Callable[[], bool] | None = None) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 (eager calls before the recording), got {warmup!r}")
        if async_capture and side_stream_warmup:
            raise ValueError("async_capture records without waiting for the GPU; side_stream_warmup runs an eager pass "
                             "that the capture must wait for: choose one")
        if not isinstance(in_pieces, bool):
            raise TypeError(f"in_pieces must be True or False, got {in_pieces!r}")
        if in_pieces and not async_capture:
            raise ValueError("in_pieces runs each recorded piece while the host records the next; that needs "
                             "async_capture (torch.cuda.graph synchronises the device at each recording)")
        if isinstance(merge_after, bool) or not isinstance(merge_after, int) or merge_after < 0:
            raise ValueError(f"merge_after must be an int >= 0 (calls that run the pieces before they are merged; 0: "
                             f"never), got {merge_after!r}")
        if merge_after and not in_pieces:
            raise ValueError("merge_after merges a recording made in pieces; it needs in_pieces=True")
        if merged_fn is not None and not merge_after:
            raise ValueError("merged_fn is recorded when the pieces are merged; it needs merge_after > 0")
        if merged_warmup is not None and merged_fn is None:
            raise ValueError("merged_warmup says whether merged_fn needs an eager call before its recording; it needs "
                             "merged_fn")
        for name, f in (("merged_fn", merged_fn), ("merged_warmup", merged_warmup)):
            if f is not None and not callable(f):
                raise TypeError(f"{name} must be callable, got {type(f).__name__}")
        #: what the merged recording records instead of ``fn`` (None: ``fn``): a function of the same arguments with the
        #: same outputs, computed by other kernels (the SLaT torso compiled without piece ends, its blocks inlined). Its
        #: values may differ from the pieces' by rounding; replays after the merge give its values
        self.merged_fn = merged_fn
        #: called before the merged recording where ``merged_fn`` is given: True means ``merged_fn`` has not run in the
        #: process yet (its first call may compile, which a recording cannot), so it runs once eagerly on the entry's
        #: inputs first and its output is dropped
        self.merged_warmup = merged_warmup
        #: with ``in_pieces``: after this many calls that ran the pieces, record the call again as one graph (without a
        #: sync and without running it, while the pieces' replays queued ahead keep the GPU busy) and replay that from
        #: then on, saving the pieces' extra launches on every later call (0: keep the pieces)
        self.merge_after = merge_after
        self.fn = fn
        #: record one graph per stretch between ``graph_piece_end`` calls of ``fn``, and, at a call (not
        #: :meth:`prepare`), queue each piece as soon as it is recorded: the GPU runs the first pieces while the host
        #: records the later ones, so a recording made with nothing queued ahead (the first SLaT pass of an object)
        #: idles the GPU for about its host time less the pass's GPU time, instead of its whole host time. Later calls
        #: replay the pieces in order (one launch each). The same kernels on the same inputs: the values are the
        #: single graph's.
        self.in_pieces = in_pieces
        self.warmup = warmup
        #: record on a side stream without ``torch.cuda.graph``'s device synchronisation and cache flush, so that the
        #: GPU keeps running the work already queued while the host records. A sampler whose graph replays have run
        #: ahead of the GPU (the SLaT loop reaching its first unguided step) then records its second graph behind
        #: that queue instead of draining it first (session 14's idle timeline: ~50 ms of idle GPU per recording at
        #: 14k voxels). The recording uses ``thread_local`` mode: unsafe CUDA calls made by other threads meanwhile do
        #: not invalidate it (an illegal call in this thread still does, and raises).
        self.async_capture = async_capture
        #: memory pool shared with other graphs (None: each graph gets a private pool of its own)
        self.pool = pool
        #: run one more eager pass on a side stream right before capturing (what ``torch.cuda.graphs``
        #: recommends for lazy initialisation). Off by default: the ``warmup`` eager calls have already
        #: done that work, and the extra pass cost more than the replays saved (H100, session 5).
        self.side_stream_warmup = side_stream_warmup
        self._seen: dict[Signature, int] = {}
        self._captured: dict[Signature, _Captured] = {}
        self._failed: dict[Signature, str] = {}
        self.replays = 0
        self.captures = 0

    @staticmethod
    def signature(args: tuple[Tensor, ...]) -> Signature:
        for a in args:
            if not isinstance(a, Tensor):
                raise TypeError(f"GraphedCall arguments must be tensors, got {type(a).__name__}")
        return tuple((tuple(a.shape), a.dtype, a.device) for a in args)

    def __call__(self, *args: Tensor) -> Any:
        sig = self.signature(args)
        if not args or args[0].device.type != "cuda":
            return self.fn(*args)
        entry = self._captured.get(sig)
        if entry is None:
            seen = self._seen.get(sig, 0)
            if seen < self.warmup:
                self._seen[sig] = seen + 1
                return self.fn(*args)
            if sig in self._failed:
                raise RuntimeError(f"recording the CUDA graph of this call failed before ({self._failed[sig]}); "
                                   f"not retried, since a failed capture can leave CUDA state behind")
            try:
                entry = self._capture(args)
            except Exception as exc:
                self._failed[sig] = f"{type(exc).__name__}: {exc}"
                raise
            self._captured[sig] = entry
            if entry.ran:  # the recording ran its pieces on these inputs already
                entry.ran = False
                entry.piece_calls += 1
                self.replays += 1
                return pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, entry.output)
        if entry.stream is not None and torch.cuda.current_stream(args[0].device) != entry.stream:
            raise RuntimeError("this graph was recorded in pieces for replays on another stream; its pieces and merged "
                               "graph share a memory pool, which is safe only while every replay runs on that one "
                               "stream")
        if entry.more and self.merge_after and not entry.merge_failed and entry.piece_calls >= self.merge_after:
            try:
                self._merge(entry)
            except Exception as exc:  # the pieces still work: keep them, do not try again
                entry.merge_failed = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"merging the recorded pieces into one graph failed ({entry.merge_failed}); the pieces "
                              f"stay in use", RuntimeWarning, stacklevel=2)
        for buf, a in zip(entry.inputs, args):
            buf.copy_(a)
        entry.replay()
        if entry.more:
            entry.piece_calls += 1
        self.replays += 1
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, entry.output)

    def prepare(self, *args: Tensor) -> bool:
        """Record the graph of ``args``' signature now, without replaying it (the recorded kernels do not run; only
        the copies of ``args`` into the graph's input buffers are queued), so that a later call with that signature
        only replays. For a caller whose host is ahead of the GPU: with ``async_capture`` the recording's host time
        then overlaps the work queued ahead (``torch.cuda.graph`` would synchronise the device first). Only without
        warm-up calls (``warmup=0``: the function's caches must be built already) and without
        ``side_stream_warmup`` (an eager pass). Returns whether it recorded (False off CUDA, where calls run eagerly,
        or where the signature is recorded already)."""
        if self.warmup != 0:
            raise ValueError(f"prepare records without an eager warm-up call; this GraphedCall has warmup={self.warmup}")
        if self.side_stream_warmup:
            raise ValueError("prepare records without running the function; side_stream_warmup would run it eagerly "
                             "first")
        sig = self.signature(args)
        if not args or args[0].device.type != "cuda" or sig in self._captured:
            return False
        if sig in self._failed:
            raise RuntimeError(f"recording the CUDA graph of this call failed before ({self._failed[sig]}); "
                               f"not retried, since a failed capture can leave CUDA state behind")
        try:
            self._captured[sig] = self._capture(args, run_pieces=False)
        except Exception as exc:
            self._failed[sig] = f"{type(exc).__name__}: {exc}"
            raise
        return True

    def _capture(self, args: tuple[Tensor, ...], run_pieces: bool = True) -> _Captured:
        inputs = [a.clone() for a in args]
        if self.side_stream_warmup:
            side = torch.cuda.Stream(device=inputs[0].device)
            side.wait_stream(torch.cuda.current_stream(inputs[0].device))
            with torch.cuda.stream(side):
                self.fn(*inputs)
            torch.cuda.current_stream(inputs[0].device).wait_stream(side)
        pool = None if self.pool is None else self.pool.handle(inputs[0].device)
        if self.in_pieces:
            if pool is None:  # a pool of the pieces' own, known to a later merged recording
                pool = torch.cuda.graph_pool_handle()
            pieces, output = _record_in_pieces(self.fn, inputs, pool, run_pieces)
            self._count_recording(inputs[0].device)
            return _Captured(pieces[0], inputs, output, more=pieces[1:], ran=run_pieces, pool=pool,
                             stream=torch.cuda.current_stream(inputs[0].device))
        graph = torch.cuda.CUDAGraph()
        if self.async_capture:
            output = _record_without_sync(graph, self.fn, inputs, pool)
        else:
            with torch.cuda.graph(graph, pool=pool):
                output = self.fn(*inputs)
        self._count_recording(inputs[0].device)
        return _Captured(graph, inputs, output)

    def _merge(self, entry: _Captured) -> None:
        """Record ``entry``'s call as one graph on its input buffers and in its pieces' pool, and use it from now on."""
        fn = self.fn if self.merged_fn is None else self.merged_fn
        if self.merged_fn is not None and self.merged_warmup is not None and self.merged_warmup():
            # on the current stream, after the replays queued so far; it reads the previous call's inputs (this call's
            # are copied in after the merge) and its output is dropped: it only compiles
            fn(*entry.inputs)
        graph = torch.cuda.CUDAGraph()
        output = _record_without_sync(graph, fn, entry.inputs, entry.pool)
        self._count_recording(entry.inputs[0].device)
        if self.merged_fn is not None:
            _check_same_outputs(output, entry.output)
        entry.retired = [entry.graph, *entry.more, entry.output]
        entry.graph, entry.more, entry.output = graph, [], output

    def _count_recording(self, device: torch.device) -> None:
        self.captures += 1
        index = device.index if device.index is not None else torch.cuda.current_device()
        _RECORDINGS[index] = _RECORDINGS.get(index, 0) + 1


def _check_same_outputs(merged: Any, pieces: Any) -> None:
    """Refuse a merged recording whose outputs differ in structure, shape or dtype from the pieces' (callers would get
    other tensors after the merge); the merge then fails and the pieces stay in use."""
    m_leaves, m_spec = pytree.tree_flatten(merged)
    p_leaves, p_spec = pytree.tree_flatten(pieces)
    if m_spec != p_spec or any(
            isinstance(a, Tensor) != isinstance(b, Tensor)
            or (isinstance(a, Tensor) and (a.shape != b.shape or a.dtype != b.dtype))
            for a, b in zip(m_leaves, p_leaves)):
        raise ValueError(f"merged_fn's outputs differ from the pieces' ({m_spec} against {p_spec}, or a shape or "
                         f"dtype): the merged graph would return other values than the pieces")


_CAPTURE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}
#: one recording at a time in the process: the capture stream is shared, and a recording in pieces leaves it between
#: captures, where another thread's recording could otherwise begin on it
_RECORDING_LOCK = threading.RLock()
_RECORDINGS: dict[int, int] = {}  # CUDA device index -> graphs recorded by GraphedCall (the pools' keepers excluded)


def recordings(index: int) -> int:
    """How many graphs :class:`GraphedCall` objects have recorded on CUDA device ``index`` in this process (what
    ``profile.latency.cuda_graph_recordings`` adds to inductor's count)."""
    return _RECORDINGS.get(index, 0)


def _capture_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream this process records ``device``'s graphs on (made at first use)."""
    stream = _CAPTURE_STREAMS.get(device)
    if stream is None:
        stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream(device=device)
    return stream


def _record_without_sync(graph: "torch.cuda.CUDAGraph", fn: Callable[..., Any], inputs: list[Tensor],
                         pool=None) -> Any:
    """Record ``fn(*inputs)`` into ``graph`` on a per-device side stream, leaving the work queued on the current
    stream running. Unlike ``torch.cuda.graph`` this neither synchronises the device nor empties the allocator's cache
    (neither is needed for a correct recording: the recorded kernels do not run until a replay, which the caller
    enqueues on the current stream after the work that filled ``inputs``). The graph's memory comes from its own
    private pool (or ``pool``), as with ``torch.cuda.graph``."""
    device = inputs[0].device
    stream = _capture_stream(device)
    if pool is None:  # a pool of its own, as capture_begin would make, but with an id known if the recording fails
        pool = torch.cuda.graph_pool_handle()
    with _RECORDING_LOCK, torch.cuda.stream(stream):
        graph.capture_begin(pool, capture_error_mode="thread_local")
        try:
            output = fn(*inputs)
            graph.capture_end()  # inside: a capture invalidated without a Python error fails here
        except BaseException:
            _end_failed_recording(graph, device, pool)
            raise
    return output


class _PieceRecording:
    """The recording in progress of :func:`_record_in_pieces`: ``cut`` ends the current graph, queues it on the
    caller's stream (with ``run``) and begins the next on the capture stream."""

    def __init__(self, stream, main, pool, run: bool) -> None:
        self.stream, self.main, self.pool, self.run = stream, main, pool, run
        self.graphs: list = []
        self.current = None

    def begin(self) -> None:
        self.current = torch.cuda.CUDAGraph()
        self.current.capture_begin(self.pool, capture_error_mode="thread_local")

    def end(self) -> None:
        graph = self.current
        graph.capture_end()  # on failure ``current`` stays set, for _end_failed_recording
        self.current = None
        self.graphs.append(graph)
        if self.run:  # queued behind the work that filled the inputs, and behind the pieces before it
            with torch.cuda.stream(self.main):
                graph.replay()

    def cut(self) -> None:
        if torch.cuda.current_stream(self.stream.device) != self.stream:
            raise RuntimeError("graph_piece_end called on another stream than the recording's (a piece cut from a "
                               "side stream would split the wrong capture)")
        self.end()
        self.begin()


def _record_in_pieces(fn: Callable[..., Any], inputs: list[Tensor], pool, run: bool) -> tuple[list, Any]:
    """Record ``fn(*inputs)`` as one graph per stretch between its ``graph_piece_end`` calls, on the per-device capture
    stream and without a sync (as :func:`_record_without_sync`), all pieces in the memory pool ``pool``: each piece's
    temporaries may be reused by the later pieces, which always replay after it. With ``run``,
    each piece is replayed on the caller's stream as soon as it is recorded, so the GPU computes the call's output
    while the host records. Returns (the pieces in order, the output)."""
    device = inputs[0].device
    stream = _capture_stream(device)
    if getattr(_PIECES, "active", None) is not None:
        raise RuntimeError("a recording in pieces is already in progress on this thread")
    recording = _PieceRecording(stream, torch.cuda.current_stream(device), pool, run)
    with _RECORDING_LOCK, torch.cuda.stream(stream):
        # each capture_begin also runs the CUDA generator's capture prologue (two small fill kernels) on the capture
        # stream, outside any capture and unordered with the pieces replayed on the caller's stream: harmless while
        # no recorded function draws random numbers (the samplers' noise is drawn outside the network calls)
        recording.begin()
        _PIECES.active = recording
        try:
            output = fn(*inputs)
            _PIECES.active = None
            recording.end()  # inside: a failing last capture_end leaves ``current`` set for the cleanup below
        except BaseException:
            if recording.current is not None:
                _end_failed_recording(recording.current, device, pool)
            raise
        finally:
            _PIECES.active = None
    return recording.graphs, output


def _end_failed_recording(graph: "torch.cuda.CUDAGraph", device: torch.device, pool) -> None:
    """Take the stream out of capture mode after ``fn`` raised inside a recording. A Python error leaves the capture
    valid, and ``capture_end`` then also returns the pool to the allocator. An illegal CUDA call (a sync, ``.item()``)
    invalidates the capture: ``capture_end`` raises before it releases the pool, so the allocator would keep routing
    into it and never free it; end and release it here (what inductor's cudagraph trees do after a failed warm-up)."""
    try:
        graph.capture_end()
    except RuntimeError:
        index = device.index if device.index is not None else torch.cuda.current_device()
        # the caller re-raises the recording's own error; a torch that already ended the pool refuses these calls
        with contextlib.suppress(RuntimeError):
            torch._C._cuda_endAllocateToPool(index, pool)
        with contextlib.suppress(RuntimeError):
            torch._C._cuda_releasePool(index, pool)


__all__ = ["GraphPool", "GraphedCall", "graph_piece_end", "recordings"]
