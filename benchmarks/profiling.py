"""Where a step's time goes: torch.profiler's events grouped by what they do.

Every profiled op's self time (CPU time on CPU; on CUDA the device time of the kernels it
launched) goes to exactly one group, chosen in this order:

    outside ops      the self time of the ``ProfilerStep#N`` spans: Python, data loading, callbacks
                     (CPU only; what no op accounts for)
    dtype conversions   ``aten::_to_copy`` and what runs under it (autocast's casts, ``.to(dtype)``),
                     and any ``aten::copy_`` between two floating dtypes
    optimizer        AdamW's step and zero_grad (``Optimizer.*`` spans) and the ``_foreach_*`` ops
                     (gradient clipping)
    attention        scaled-dot-product / flash / efficient attention kernels and what runs under them
    matmul           mm, addmm, bmm, matmul, linear and friends
    element-wise over (tokens, vocab)   any other op with an input whose last dimension is the vocabulary
                     (log-softmax, exp, max, sums over logits; the head's buffers)
    other ops        everything else (norms, rotary, activations, masks, metrics, ...)

``count_kernels_in`` counts the ops, CUDA kernels and float64 work under a labelled span
(``torch.profiler.record_function``), for the phi link's count in ``gpu_check.py``.
"""

from __future__ import annotations

from collections import defaultdict

OUTSIDE = "outside ops (Python, data, callbacks)"
CONVERSIONS = "dtype conversions"
OPTIMIZER = "optimizer (AdamW, grad clipping)"
ATTENTION = "attention"
MATMUL = "matmul"
VOCAB = "element-wise over (tokens, vocab)"
OTHER = "other ops"
GROUPS = (MATMUL, VOCAB, CONVERSIONS, ATTENTION, OPTIMIZER, OTHER, OUTSIDE)

MATMUL_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::addmm_",
    "aten::_addmm_activation",
    "aten::bmm",
    "aten::baddbmm",
    "aten::matmul",
    "aten::linear",
    "aten::mv",
    "aten::addmv",
    "aten::dot",
}
ATTENTION_MARKS = ("scaled_dot_product", "flash_attention", "efficient_attention", "_flash_attn", "flex_attention")
# Leaf ops that only allocate, view or query: no kernel runs for them.
NO_KERNEL_OPS = {
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::to",
    "aten::result_type",
    "aten::broadcast_tensors",
    "aten::detach",
    "aten::alias",
    "aten::lift_fresh",
    "aten::view",
    "aten::_reshape_alias",
    "aten::reshape",
    "aten::as_strided",
    "aten::expand",
    "aten::t",
    "aten::transpose",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::slice",
    "aten::select",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::item",
    "aten::_local_scalar_dense",
}
FLOAT_TYPES = {"float", "double", "c10::Half", "c10::BFloat16", "c10::Float8_e4m3fn", "c10::Float8_e5m2"}


def _chain(event):
    """The event and its CPU ancestors, innermost first."""
    while event is not None:
        yield event
        event = event.cpu_parent


def _tensor_shapes(event):
    return [s for s in (event.input_shapes or []) if isinstance(s, list) and all(isinstance(x, int) for x in s)]


def _is_conversion(event, names) -> bool:
    if "aten::_to_copy" in names:
        return True
    if event.name == "aten::copy_":
        dtypes = [t for t in (getattr(event, "input_dtypes", None) or [])[:2]]
        return len(dtypes) == 2 and dtypes[0] != dtypes[1] and set(dtypes) <= FLOAT_TYPES
    return False


def classify(event, vocab_size: int) -> str:
    name = event.name
    if name.startswith("ProfilerStep"):
        return OUTSIDE
    names = [e.name for e in _chain(event)]
    if _is_conversion(event, names):
        return CONVERSIONS
    if any(n.startswith("Optimizer.") for n in names) or name.startswith("aten::_foreach_"):
        return OPTIMIZER
    if any(mark in n for n in names for mark in ATTENTION_MARKS):
        return ATTENTION
    if name in MATMUL_OPS:
        return MATMUL
    if any(len(s) >= 2 and s[-1] == vocab_size for s in _tensor_shapes(event)):
        return VOCAB
    return OTHER


def op_groups(events, vocab_size: int, device_time: bool = False, top: int = 3) -> dict:
    """Group ``events`` (``prof.events()``, recorded with ``record_shapes=True``) into ``GROUPS``.

    Returns {"groups": {group: {"ms": total self time, "share": of all, "top": [[op, ms], ...]}},
    "total_ms", "steps" (profiled steps), "device_time"}; times are per profiled step."""
    from torch.autograd import DeviceType

    per_group, per_op = defaultdict(float), defaultdict(lambda: defaultdict(float))
    steps = 0
    for event in events:
        if event.device_type != DeviceType.CPU:  # a kernel: its time is already its launching op's
            continue
        if event.name.startswith("ProfilerStep"):
            steps += 1
        us = event.self_device_time_total if device_time else event.self_cpu_time_total
        if not us:
            continue
        group = classify(event, vocab_size)
        if device_time and group == OUTSIDE:
            continue
        per_group[group] += us
        per_op[group][event.name] += us
    steps = max(steps, 1)
    total = sum(per_group.values())
    groups = {}
    for group in GROUPS:
        if group not in per_group:
            continue
        ops = sorted(per_op[group].items(), key=lambda kv: -kv[1])[:top]
        groups[group] = {
            "ms": per_group[group] / steps / 1e3,
            "share": per_group[group] / total if total else 0.0,
            "top": [[op, us / steps / 1e3] for op, us in ops],
        }
    return {"groups": groups, "total_ms": total / steps / 1e3, "steps": steps, "device_time": device_time}


def render_groups(title: str, breakdown: dict) -> list[str]:
    """Markdown lines: one row per group, ms per step, share, the largest ops."""
    clock = "device (CUDA kernel) time" if breakdown["device_time"] else "CPU self time"
    L = [
        f"### {title}\n",
        f"{breakdown['steps']} profiled step(s); {clock}, {breakdown['total_ms']:.1f} ms per step in all.\n",
        "| group | ms/step | share | largest ops (ms/step) |",
        "| --- | ---: | ---: | --- |",
    ]
    for group, g in breakdown["groups"].items():
        ops = ", ".join(f"`{op}` {ms:.1f}" for op, ms in g["top"])
        L.append(f"| {group} | {g['ms']:.1f} | {100 * g['share']:.1f} % | {ops} |")
    L.append("")
    return L


def count_kernels_in(events, label: str) -> dict:
    """Under every span named ``label``: its calls, the aten ops (leaves: ops with no op below them),
    the compute ops among them (not ``NO_KERNEL_OPS``: each is a kernel launch on a GPU), those with a
    float64 input, the float64 elements they read, the CUDA kernels launched and their device time
    (ms), totalled over the profile."""
    out = dict(calls=0, ops=0, compute_ops=0, float64_ops=0, float64_elements=0, kernels=0, kernel_ms=0.0, cpu_ms=0.0)

    def visit(event):
        children = [c for c in event.cpu_children if c.name.startswith("aten::")]
        kernels = getattr(event, "kernels", None) or []
        out["kernels"] += len(kernels)
        out["kernel_ms"] += sum(k.duration for k in kernels) / 1e3
        if event.name.startswith("aten::") and not children:
            out["ops"] += 1
            if event.name in NO_KERNEL_OPS:
                return
            out["compute_ops"] += 1
            dtypes = getattr(event, "input_dtypes", None) or []
            shapes = event.input_shapes or []
            doubles = [s for s, t in zip(shapes, dtypes) if t == "double" and isinstance(s, list)]
            if doubles:
                out["float64_ops"] += 1
                out["float64_elements"] += sum(_numel(s) for s in doubles)
        for child in event.cpu_children:
            visit(child)

    for event in events:
        if event.name == label and not any(p.name == label for p in _chain(event.cpu_parent)):
            out["calls"] += 1
            out["cpu_ms"] += event.cpu_time_total / 1e3
            visit(event)
    return out


def _numel(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n
