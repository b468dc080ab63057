"""FLOPs per module and per stage, by two independent counters plus closed-form module rules.

Convention: **1 multiply-add = 2 FLOPs**; only matrix products, convolutions and attention are
counted (what ``torch.utils.flop_counter.FlopCounterMode`` counts). fvcore counts 1 per
multiply-add, so its numbers are multiplied by 2, and its norm / upsample / pooling handlers are
switched off so both counters count the same op classes. A run's total is the sum over every
network pass of that run (SS steps x CFG branches, SLaT steps, decoder), i.e. "TFLOPs per object"
as the Fast-SAM3D paper reports it.

Counters:

* ``flops_executed``: ``FlopCounterMode`` over the real run, op by op, i.e. what our PyTorch
  implementation executed (for padded variable-length attention that includes the padding). CPU
  SDPA (``_scaled_dot_product_flash_attention_for_cpu``), which FlopCounterMode does not know, is
  registered here.
* ``flops``: the same with **module rules** applied: for module types whose cost is defined by the
  algorithm rather than by the ops our implementation happens to use (sparse convolution: one
  product per active neighbour pair; attention over variable-length sparse sequences: sum of
  per-segment lengths products, as flash-attn varlen computes), the op-level count inside the
  module is replaced by a closed form. This is the number to compare with the paper / the official
  GPU kernels.
* ``flops_fvcore`` / ``flops_fvcore_executed``: fvcore's ``FlopCountAnalysis`` (jit trace) of every
  distinct network call of the run (calls with identical shapes and identical integer inputs, e.g.
  voxel coordinates, are traced once and multiplied by their count), with handlers for
  ``aten::scaled_dot_product_attention`` and the same module rules.

Glue outside the networks (e.g. the SS stage's surface-voxel 3x3x3 convolution) is seen by
FlopCounterMode only (fvcore traces networks); it is reported per stage in
``attrs["outside_networks"]``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from collections import defaultdict
from typing import Any, Callable

import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .closed_form import linear_flops, sparse_conv_flops, varlen_attention_flops
from .modules import ModuleSpec, category, depth, is_pipeline, network_paths, select_modules, stage_of, stage_roots
from .workload import make_runner

#: fvcore default handlers that are not matrix products (switched off to match FlopCounterMode)
FVCORE_DISABLED_OPS = ("aten::batch_norm", "aten::group_norm", "aten::layer_norm", "aten::instance_norm",
                       "aten::upsample_nearest2d", "aten::upsample_bilinear2d", "aten::adaptive_avg_pool2d",
                       "aten::grid_sampler")

RuleFn = Callable[[nn.Module, tuple, dict, Any], int]
#: module type -> closed-form FLOPs of one call (see :func:`register_flop_rule`)
FLOP_RULES: dict[type, RuleFn] = {}


def register_flop_rule(module_type: type) -> Callable[[RuleFn], RuleFn]:
    """Decorator: count calls of ``module_type`` with ``fn(module, args, kwargs, output) -> FLOPs``
    instead of the ops inside it (in every counter)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"flop rules are keyed on nn.Module subclasses, got {module_type!r}")

    def deco(fn: RuleFn) -> RuleFn:
        FLOP_RULES[module_type] = fn
        return fn
    return deco


def rule_for(module: nn.Module) -> RuleFn | None:
    for t in type(module).__mro__:
        if t in FLOP_RULES:
            return FLOP_RULES[t]
    return None


# ------------------------------------------------------------------------------------------------
# Rules for our sparse modules
# ------------------------------------------------------------------------------------------------
def neighbour_pair_count(coords: Tensor, kernel_size: int) -> int:
    """Active (output, input) pairs of a submanifold conv (centre included), vectorised."""
    if kernel_size == 1:
        return int(coords.shape[0])
    c = coords.long()
    p = kernel_size // 2
    ext = int(c[:, 1:].max()) + 2 * p + 1 if len(c) else 1
    keys = ((c[:, 0] * ext + c[:, 1] + p) * ext + c[:, 2] + p) * ext + c[:, 3] + p
    count = 0
    for dx in range(-p, p + 1):
        for dy in range(-p, p + 1):
            for dz in range(-p, p + 1):
                count += int(torch.isin(keys + (dx * ext + dy) * ext + dz, keys).sum())
    return count


def _arg(args: tuple, kwargs: dict, i: int, name: str) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name)


def _window_lengths(coords: Tensor, window: int, shift: Any) -> list[int]:
    s = torch.as_tensor(shift if not isinstance(shift, int) else [shift] * 3, device=coords.device)
    w = torch.div(coords[:, 1:].long() + s, window, rounding_mode="floor")
    _, counts = torch.unique(torch.cat([coords[:, :1].long(), w], 1), dim=0, return_counts=True)
    return [int(n) for n in counts.tolist()]


def _install_default_rules() -> None:
    try:
        from fs3d_accel.model.sparse import SparseConv3d, SparseCrossAttention, SparseSelfAttention
    except ImportError:  # pragma: no cover - model package absent
        return

    @register_flop_rule(SparseConv3d)
    def _sparse_conv(mod, args, kwargs, out) -> int:
        x = _arg(args, kwargs, 0, "x")
        key = ("fs3d_profile_pairs", mod.kernel_size)
        if key not in x.cache:
            x.cache[key] = neighbour_pair_count(x.coords, mod.kernel_size)
        return sparse_conv_flops(x.cache[key], mod.in_channels, mod.out_channels)

    @register_flop_rule(SparseSelfAttention)
    def _sparse_self_attn(mod, args, kwargs, out) -> int:
        x = _arg(args, kwargs, 0, "x")
        n, c, h = len(x), mod.channels, mod.num_heads
        if mod.mode == "full":
            segs = list(x.seqlens)
        else:
            segs = _window_lengths(x.coords, mod.window_size, mod.shift_window)
        return linear_flops(n, c, 3 * c) + varlen_attention_flops(h, segs, None, c // h) + linear_flops(n, c, c)

    @register_flop_rule(SparseCrossAttention)
    def _sparse_cross_attn(mod, args, kwargs, out) -> int:
        x = _arg(args, kwargs, 0, "x")
        context = _arg(args, kwargs, 1, "context")
        kv = _arg(args, kwargs, 2, "kv")
        n, c, h = len(x), mod.channels, mod.num_heads
        f = 2 * linear_flops(n, c, c)  # to_q, to_out
        segs = list(x.seqlens)
        if kv is None:
            b, l, cc = context.shape
            f += linear_flops(b * l, cc, 2 * c)
            kv_lens = [l] * len(segs)
        elif len(kv) != 2:  # per-element K/V (collapse_zero_condition_kv): their own key counts
            kv_lens = [k.shape[1] for k in kv[0::2]]
        else:
            kv_lens = [kv[0].shape[1]] * len(segs)
        # attention over one key is its value, no products (``layers.attention``): as FlopCounterMode sees it
        kv_lens = [0 if n == 1 else n for n in kv_lens]
        return f + varlen_attention_flops(h, segs, kv_lens, c // h)


_install_default_rules()


# ------------------------------------------------------------------------------------------------
# Op handlers missing from the counters
# ------------------------------------------------------------------------------------------------
def _sdpa_macs(q: tuple, k: tuple, v: tuple) -> int:
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _fcm_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _sdpa_macs(tuple(query_shape), tuple(key_shape), tuple(value_shape))


def sdpa_flop_mapping() -> dict:
    """``FlopCounterMode(custom_mapping=...)`` entries for the SDPA kernels torch's counter does not know (the CPU
    ones): without them a CPU count leaves out every attention."""
    aten = torch.ops.aten
    mapping = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = _fcm_sdpa
    return mapping


def _fvcore_sdpa(inputs: list, outputs: list) -> int:
    from fvcore.nn.jit_handles import get_shape
    q, k, v = (tuple(get_shape(x)) for x in inputs[:3])
    return _sdpa_macs(q, k, v)


def _fvcore_baddbmm(inputs: list, outputs: list) -> int:
    from fvcore.nn.jit_handles import get_shape
    a, b = get_shape(inputs[1]), get_shape(inputs[2])
    return a[0] * a[1] * a[2] * b[2]


# ------------------------------------------------------------------------------------------------
# Hooks: rules, call capture, bytes
# ------------------------------------------------------------------------------------------------
def _tensors(obj: Any) -> list[Tensor]:
    """Tensor leaves of nested containers / dataclasses (SparseTensor -> feats, coords)."""
    out: list[Tensor] = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, Tensor):
            out.append(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            stack.extend(getattr(o, f.name) for f in dataclasses.fields(o) if f.name != "cache")
    return out


def _nbytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _signature(args: tuple, kwargs: dict) -> str:
    """Shapes/dtypes of float tensors and the content of integer tensors: equal signatures have
    equal FLOPs."""
    h = hashlib.sha1()

    def visit(o: Any) -> None:
        if isinstance(o, Tensor):
            h.update(f"T{tuple(o.shape)}{o.dtype}{o.device};".encode())
            if not o.is_floating_point():
                h.update(o.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(o, dict):
            h.update(b"{")
            for k in o:
                h.update(str(k).encode())
                visit(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for v in o:
                visit(v)
            h.update(b"]")
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            h.update(type(o).__name__.encode())
            for f in dataclasses.fields(o):
                if f.name != "cache":
                    visit(getattr(o, f.name))
        elif isinstance(o, (int, str, bool, type(None))):
            h.update(repr(o).encode())
        else:
            h.update(type(o).__name__.encode())

    visit((args, kwargs))
    return h.hexdigest()


class _Hooks:
    """Rule closed forms, network call capture and per-module bytes, for one counting run."""

    def __init__(self, root: nn.Module, capture: list[str] | None, track_bytes: bool) -> None:
        self.root = root
        self.paths = {m: p for p, m in root.named_modules()}
        self.rule_paths = {p for p, m in root.named_modules() if rule_for(m) is not None}
        self.closed: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.captured: dict[str, dict[str, list]] = {p: {} for p in (capture or [])}
        self.track_bytes = track_bytes
        self._param_bytes = {p: sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
                             for p, m in root.named_modules()} if track_bytes else {}
        self._in_bytes: dict[str, list[int]] = defaultdict(list)
        self._handles: list[Any] = []

    def __enter__(self) -> "_Hooks":
        try:
            for p, m in self.root.named_modules():
                if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
                    continue
                self._handles.append(m.register_forward_pre_hook(self._pre(p), with_kwargs=True))
                self._handles.append(m.register_forward_hook(self._post(p), with_kwargs=True, always_call=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, path: str) -> Callable:
        def hook(mod, args, kwargs):
            self.calls[path] += 1
            if self.track_bytes:
                self._in_bytes[path].append(_nbytes((args, kwargs)))
            if path in self.captured:
                sig = _signature(args, kwargs)
                slot = self.captured[path].setdefault(sig, [args, kwargs, 0])
                slot[2] += 1
        return hook

    def _post(self, path: str) -> Callable:
        def hook(mod, args, kwargs, out):
            if path in self.rule_paths and out is not None:
                self.closed[path] += int(rule_for(mod)(mod, args, kwargs, out))
            if self.track_bytes and self._in_bytes[path]:
                self.bytes[path] += self._in_bytes[path].pop() + _nbytes(out) + self._param_bytes[path]
        return hook


def _outermost(paths: set[str]) -> set[str]:
    return {p for p in paths if not any(q != p and _under(p, q) for q in paths)}


def _under(path: str, ancestor: str) -> bool:
    return ancestor == "" or path == ancestor or path.startswith(ancestor + ".")


def _ancestors(path: str) -> list[str]:
    """'' and every prefix of ``path`` up to ``path`` itself."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts) + 1)]


def _apply_rules(raw: dict[str, float], closed: dict[str, float], rule_paths: set[str]) -> dict[str, float]:
    """Replace the raw count inside each outermost rule module by its closed form, for the module
    and all its ancestors."""
    out = dict(raw)
    for r in _outermost({p for p in rule_paths if p in closed or p in raw}):
        delta = closed.get(r, 0) - raw.get(r, 0)
        for p in _ancestors(r):
            out[p] = out.get(p, 0) + delta
    return out


def _rule_delta(raw: dict[str, float], closed: dict[str, float], rule_paths: set[str]) -> float:
    return sum(closed.get(r, 0) - raw.get(r, 0) for r in _outermost({p for p in rule_paths if p in closed or p in raw}))


# ------------------------------------------------------------------------------------------------
# FlopCounterMode
# ------------------------------------------------------------------------------------------------
_ROOT_NAME = "__root__"


def _fcm_run(root: nn.Module, run: Callable[[], Any], hooks: _Hooks) -> dict[str, float]:
    """Raw FlopCounterMode counts per module path ('' = root) for one run."""
    fcm = FlopCounterMode(display=False, custom_mapping=sdpa_flop_mapping())
    tracker = fcm.mod_tracker
    if not (hasattr(tracker, "_known_modules") and hasattr(tracker, "_seen_modules")):
        raise RuntimeError("this torch's ModuleTracker has no _known_modules/_seen_modules; cannot name modules")
    for p, m in root.named_modules():  # name modules by their path, not by the first class seen
        tracker._known_modules[m] = p or _ROOT_NAME
        tracker._seen_modules.add(m)
    with torch.no_grad(), hooks, fcm:
        run()
    out: dict[str, float] = {}
    for name, ops in fcm.get_flop_counts().items():
        if name == "Global":
            out["__global__"] = float(sum(ops.values()))
            continue
        out["" if name == _ROOT_NAME else name] = float(sum(ops.values()))
    return out


# ------------------------------------------------------------------------------------------------
# fvcore
# ------------------------------------------------------------------------------------------------
class _BoundCall(nn.Module):
    """``m(*args, **kwargs)`` with the tensor leaves as positional inputs (jit-traceable)."""

    def __init__(self, m: nn.Module, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.m = m
        from torch.utils._pytree import tree_flatten
        self._leaves, self._spec = tree_flatten((args, kwargs))
        self._idx = [i for i, v in enumerate(self._leaves) if isinstance(v, Tensor)]

    def inputs(self) -> tuple:
        return tuple(self._leaves[i] for i in self._idx)

    def forward(self, *tensors: Tensor):
        from torch.utils._pytree import tree_unflatten
        leaves = list(self._leaves)
        for i, t in zip(self._idx, tensors):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, self._spec)
        outs = _tensors(self.m(*args, **kwargs))
        return tuple(outs) if outs else (torch.zeros(()),)


def _fvcore_call(module: nn.Module, path: str, args: tuple, kwargs: dict, root: nn.Module) -> tuple[dict, dict]:
    """(raw fvcore FLOPs per path (x2), closed-form rule FLOPs per path) for one call."""
    bound = _BoundCall(module, args, kwargs)
    hooks = _Hooks(root, None, track_bytes=False)
    with warnings.catch_warnings(), torch.no_grad(), hooks:
        warnings.simplefilter("ignore")  # tracer and torch.jit deprecation warnings (fvcore import)
        from fvcore.nn import FlopCountAnalysis
        from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS

        fa = FlopCountAnalysis(bound, bound.inputs())
        # set_op_handle(op, None) does not drop a default handler: rebuild the table instead
        fa.clear_op_handles()
        fa.set_op_handle(**{k: v for k, v in _DEFAULT_SUPPORTED_OPS.items() if k not in FVCORE_DISABLED_OPS})
        fa.set_op_handle("aten::scaled_dot_product_attention", _fvcore_sdpa)
        fa.set_op_handle("aten::baddbmm", _fvcore_baddbmm)
        fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        by_mod = fa.by_module()
    raw = {}
    for name, v in by_mod.items():
        if name == "":
            continue  # the wrapper
        rel = name[2:] if name.startswith("m.") else ("" if name == "m" else None)
        if rel is None:
            continue
        full = rel if path == "" else (path if rel == "" else f"{path}.{rel}")
        raw[full] = 2.0 * v
    return raw, dict(hooks.closed)


def _called_children(module: nn.Module, path: str) -> dict[str, nn.Module]:
    """Direct callable children (containers are looked through), by full path."""
    out: dict[str, nn.Module] = {}
    for name, child in module.named_children():
        cp = name if path == "" else f"{path}.{name}"
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            out.update(_called_children(child, cp))
        else:
            out[cp] = child
    return out


def _fvcore_with_fallback(module: nn.Module, path: str, args: tuple, kwargs: dict, root: nn.Module,
                          fallbacks: dict[str, str], max_depth: int = 3) -> tuple[dict, dict]:
    """fvcore counts of one call; where the jit trace fails, trace the module's children calls
    instead (captured by running the call eagerly once) and record why in ``fallbacks``.

    Ops executed directly in the failing module's own forward (outside its children) are then not
    seen by fvcore; they show up as a difference to FlopCounterMode.
    """
    try:
        return _fvcore_call(module, path, args, kwargs, root)
    except Exception as exc:
        if max_depth == 0:
            raise
        fallbacks[path] = f"{type(exc).__name__}: {exc}"[:300]
    children = _called_children(module, path)
    captured: dict[str, dict[str, list]] = {p: {} for p in children}
    handles = []

    def pre(p: str) -> Callable:
        def hook(mod, a, kw):
            captured[p].setdefault(_signature(a, kw), [a, kw, 0])[2] += 1
        return hook
    try:
        for p, c in children.items():
            handles.append(c.register_forward_pre_hook(pre(p), with_kwargs=True))
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    raw: dict[str, float] = defaultdict(float)
    closed: dict[str, float] = defaultdict(float)
    for p, calls in captured.items():
        for a, kw, n in calls.values():
            r, c = _fvcore_with_fallback(children[p], p, a, kw, root, fallbacks, max_depth - 1)
            for k, v in r.items():
                raw[k] += n * v
            for k, v in c.items():
                closed[k] += n * v
    # the module itself gets the sum of its children
    raw[path] += sum(v for k, v in raw.items() if k in children)
    return dict(raw), dict(closed)


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------
def count_flops(pipe_or_module: nn.Module, inputs: Any, modules: ModuleSpec = "all", fvcore: bool = True,
                track_bytes: bool = True) -> pd.DataFrame:
    """FLOPs per module and stage for one run of ``pipe_or_module`` on ``inputs``.

    Rows: every selected module that was called. Columns: ``stage``, ``module``, ``type``,
    ``category``, ``depth``, ``calls`` (per run), ``flops`` (FlopCounterMode with module rules),
    ``flops_executed`` (FlopCounterMode, op level), ``flops_fvcore``, ``flops_fvcore_executed``
    (NaN where fvcore could not trace; see ``attrs["fvcore_failures"]``), ``rule`` (True for a
    module whose count is a closed form), ``bytes_min`` (inputs + outputs + weights of every call:
    a lower bound of the memory traffic, for the roofline).

    ``attrs``: ``total_flops`` / ``total_flops_executed`` (run, FlopCounterMode),
    ``network_flops`` / ``network_flops_fvcore`` (sum over the networks: the cross-check),
    ``stage_flops`` (stage -> FLOPs), ``outside_networks`` (stage -> FLOPs outside its networks),
    ``network_calls`` (network -> [calls, distinct calls traced by fvcore]), ``fvcore_failures``,
    ``convention``.
    """
    root = pipe_or_module
    run = make_runner(root, inputs)
    nets = network_paths(root)
    pipeline = is_pipeline(root)
    hooks = _Hooks(root, nets, track_bytes)
    raw = _fcm_run(root, run, hooks)
    global_flops = raw.pop("__global__", 0.0)
    corrected = _apply_rules(raw, dict(hooks.closed), hooks.rule_paths)

    fv_raw: dict[str, float] = defaultdict(float)
    fv_closed: dict[str, float] = defaultdict(float)
    failures: dict[str, str] = {}
    fallbacks: dict[str, str] = {}
    net_calls: dict[str, list[int]] = {}
    modules_by_path = dict(root.named_modules())
    if fvcore:
        for net in nets:
            calls = hooks.captured.get(net, {})
            net_calls[net] = [sum(c[2] for c in calls.values()), len(calls)]
            for sig, (args, kwargs, n) in calls.items():
                try:
                    r, c = _fvcore_with_fallback(modules_by_path[net], net, args, kwargs, root, fallbacks)
                except Exception as exc:  # fvcore cannot trace this network: say so, keep going
                    failures[net] = f"{type(exc).__name__}: {exc}"[:500]
                    break
                for k, v in r.items():
                    fv_raw[k] += n * v
                for k, v in c.items():
                    fv_closed[k] += n * v
    fv_corrected = _apply_rules(dict(fv_raw), dict(fv_closed), hooks.rule_paths) if fvcore else {}

    def fv_value(table: dict, path: str) -> float:
        if not fvcore:
            return float("nan")
        net = next((n for n in nets if _under(path, n)), None)
        if net is None:  # a stage (or the pipeline): its networks' sum, glue outside them excluded
            inner = [n for n in nets if _under(n, path)]
            if not inner or any(n in failures for n in inner):
                return float("nan")
            return float(sum(table.get(n, 0.0) for n in inner))
        if net in failures:
            return float("nan")
        return float(table.get(path, 0.0))

    selected = select_modules(root, modules)
    rows = []
    for p, m in selected.items():
        if hooks.calls.get(p, 0) == 0:
            continue
        rows.append({
            "stage": stage_of(p, pipeline),
            "module": p,
            "type": type(m).__name__,
            "category": category(m, p, pipeline, nets),
            "depth": depth(p),
            "calls": hooks.calls[p],
            "flops": float(corrected.get(p, 0.0)),
            "flops_executed": float(raw.get(p, 0.0)),
            "flops_fvcore": fv_value(fv_corrected, p),
            "flops_fvcore_executed": fv_value(fv_raw, p),
            "rule": p in hooks.rule_paths,
            "bytes_min": float(hooks.bytes.get(p, 0)) if track_bytes else float("nan"),
        })
    df = pd.DataFrame(rows)
    roots = stage_roots(root)
    stage_flops = {s: float(corrected.get(r, 0.0)) for s, r in roots.items() if hooks.calls.get(r, 0)}
    outside = {}
    for s, r in roots.items():
        if hooks.calls.get(r, 0):
            inner = sum(corrected.get(n, 0.0) for n in nets if n != r and _under(n, r))
            outside[s] = float(corrected.get(r, 0.0) - inner) if r != "" else 0.0
    ok_nets = [n for n in nets if n not in failures]
    df.attrs.update({
        "total_flops": float(global_flops + _rule_delta(raw, dict(hooks.closed), hooks.rule_paths)),
        "total_flops_executed": float(global_flops),
        "network_flops": float(sum(corrected.get(n, 0.0) for n in ok_nets)),
        "network_flops_executed": float(sum(raw.get(n, 0.0) for n in ok_nets)),
        "network_flops_fvcore": float(sum(fv_corrected.get(n, 0.0) for n in ok_nets)) if fvcore else float("nan"),
        "network_flops_fvcore_executed": float(sum(fv_raw.get(n, 0.0) for n in ok_nets)) if fvcore else float("nan"),
        "stage_flops": stage_flops,
        "outside_networks": outside,
        "network_calls": net_calls,
        "fvcore_failures": failures,
        "fvcore_fallbacks": fallbacks,
        "convention": "FLOPs = 2 x multiply-adds of matmul / conv / attention (bias, norms, activations "
                      "not counted); fvcore MACs x 2; sparse conv and variable-length attention by "
                      "closed-form module rules in 'flops' / 'flops_fvcore'",
    })
    return df


def stage_flops_table(flops: pd.DataFrame) -> pd.DataFrame:
    """Per stage: FLOPs (rules applied) and TFLOPs per object."""
    st = flops.attrs.get("stage_flops", {})
    return pd.DataFrame({"stage": list(st), "flops": list(st.values()),
                         "tflops_per_object": [v / 1e12 for v in st.values()]})


__all__ = ["FLOP_RULES", "FVCORE_DISABLED_OPS", "count_flops", "neighbour_pair_count", "register_flop_rule",
           "rule_for", "sdpa_flop_mapping", "stage_flops_table"]
