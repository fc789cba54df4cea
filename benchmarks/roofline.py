"""The roofline of a training step: this machine's GEMM rates at the shapes of the step, and how
close each system's measured step time comes to the time its matrix products alone would take.

FLOPs counted per optimizer step, for a workload of 2B sequences of L tokens (T = 2BL tokens),
hidden size h, head size d, MLP size I, vocabulary V and S scored positions (the completion
tokens, 2B x response length):

- layers, every token: a Linear of p weights costs 2 p T in the forward and twice that in the
  backward (the input's gradient and the weight's), so 2 x params_per_layer x T x 3, with
  params_per_layer = 2 h^2 + 2 h (kv heads x d) + 3 h I (q, o; k, v; gate, up, down);
- attention scores, per layer and sequence: QK^T and AV, 2 L^2 d per head each, causal so the
  lower triangle only ((L + 1) / 2L of the square), x3 for forward + backward;
- the LM head, the scored positions only: 2 S h V, x3 for forward + backward.

Norms, rotary embeddings, activations, the softmax and the optimizer are not counted (no matrix
products). The count is the work the step needs, the same for every system of a workload: what a
system does beyond it (projecting the prompt positions through the head, recomputing the
projection in the backward) shows as a lower fraction, not as more FLOPs.

GEMM-bound time = sum over the products of FLOPs / (this machine's measured rate for that shape,
operand layout and dtype, at the benchmark's thread count). The fraction of a system is its
GEMM-bound time / its measured step time (= achieved FLOP/s / the GEMM-bound FLOP/s).
"""

from __future__ import annotations

import math
import time

from common import Workload

ROOFLINE_SYSTEMS = ("trl_dpo_pre", "mpo_phi_pre", "floor")
GROUPS = (
    "attention projections (q, k, v, o)",
    "MLP (gate, up, down)",
    "attention scores (QK^T, AV)",
    "LM head (scored positions)",
)
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _gemm(group, name, m, k, n, layout, count=1, batch=1, fraction=1.0) -> dict:
    """(batch x) (m, k) @ (k, n), ``count`` times per step; layout "nn", "nt" (the right operand a
    transposed view, as F.linear's weight) or "tn" (the left one, as a weight gradient's dy^T);
    ``fraction`` of its FLOPs is counted (causal attention: the lower triangle)."""
    return dict(
        group=group,
        name=name,
        m=m,
        k=k,
        n=n,
        layout=layout,
        count=count,
        batch=batch,
        fraction=fraction,
        flops=2.0 * m * k * n * batch * count * fraction,
    )


def step_gemms(w: Workload) -> list[dict]:
    """The matrix products of one optimizer step of ``w`` (forward + backward), with their FLOPs."""
    seqs, length = 2 * w.batch_pairs, w.max_length
    tokens, scored = seqs * length, seqs * w.response_len
    h, head_dim = w.hidden_size, w.hidden_size // w.num_heads
    kv, inter, layers = w.num_kv_heads * head_dim, w.intermediate_size, w.num_layers
    out = []

    def linear(group, name, rows, fan_in, fan_out, count):
        # y = x W^T: forward x @ W^T; backward dx = dy @ W and dW = dy^T @ x
        out.append(_gemm(group, f"{name} fwd", rows, fan_in, fan_out, "nt", count))
        out.append(_gemm(group, f"{name} bwd dx", rows, fan_out, fan_in, "nn", count))
        out.append(_gemm(group, f"{name} bwd dW", fan_out, rows, fan_in, "tn", count))

    projections, mlp, scores, head = GROUPS
    linear(projections, "q, o", tokens, h, h, 2 * layers)
    linear(projections, "k, v", tokens, h, kv, 2 * layers)
    linear(mlp, "gate, up", tokens, h, inter, 2 * layers)
    linear(mlp, "down", tokens, inter, h, layers)
    causal = (length + 1) / (2 * length)
    batch = seqs * w.num_heads
    # forward S = Q K^T, O = P V; backward dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q
    for name, m, k, n, layout in (
        ("QK^T fwd", length, head_dim, length, "nt"),
        ("AV fwd", length, length, head_dim, "nn"),
        ("dP = dO V^T", length, head_dim, length, "nt"),
        ("dV = P^T dO", length, length, head_dim, "tn"),
        ("dQ = dS K", length, length, head_dim, "nn"),
        ("dK = dS^T Q", length, length, head_dim, "tn"),
    ):
        out.append(_gemm(scores, name, m, k, n, layout, count=layers, batch=batch, fraction=causal))
    linear(head, "LM head", scored, h, w.vocab_size, 1)
    return out


def shape_key(g: dict) -> tuple:
    return (g["batch"], g["m"], g["k"], g["n"], g["layout"])


# ----------------------------------------------------------------------------- measuring


def measure_rate(batch, m, k, n, layout, dtype, device, min_s, repeats=3) -> float:
    """Best-of-``repeats`` FLOP/s of ``torch.matmul`` at this shape and layout; each timing runs
    enough calls to last ``min_s``."""
    import torch

    torch_dtype = getattr(torch, DTYPES[dtype])
    lead = (batch,) if batch > 1 else ()

    def operand(rows, cols, transposed):
        stored = (
            torch.randn(*lead, cols, rows, device=device)
            if transposed
            else torch.randn(*lead, rows, cols, device=device)
        )
        stored = stored.to(torch_dtype)
        return stored.transpose(-1, -2) if transposed else stored

    a, b = operand(m, k, layout[0] == "t"), operand(k, n, layout[1] == "t")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(calls):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            torch.matmul(a, b)
        sync()
        return time.perf_counter() - start

    timed(1)  # warm-up: kernel selection, first-touch of the output
    calls = max(1, math.ceil(min_s / max(timed(1), 1e-9)))
    best = min(timed(calls) / calls for _ in range(repeats))
    return 2.0 * batch * m * k * n / best


def run_gemm_job(job: dict) -> dict:
    """The worker's ``gemm`` system: the rate of every distinct product of the workload's step, in
    each dtype of ``settings.extra["dtypes"]``, at the run's device and thread count."""
    from common import Settings

    w, s = Workload.from_dict(job["workload"]), Settings.from_dict(job["settings"])
    min_s = float(s.extra.get("gemm_min_s", 0.1))
    gemms = step_gemms(w)
    rates = {}
    for dtype in s.extra.get("dtypes", [s.dtype]):
        measured = {}
        for g in gemms:
            key = shape_key(g)
            if key not in measured:
                measured[key] = measure_rate(*key, dtype=dtype, device=s.device, min_s=min_s)
        rates[dtype] = [measured[shape_key(g)] for g in gemms]
    return {"gemms": gemms, "rates": rates, "threads": s.threads, "device": s.device}


# ----------------------------------------------------------------------------- the roofline


def gemm_bound_s(gemms: list[dict], rates: list[float]) -> float:
    return sum(g["flops"] / r for g, r in zip(gemms, rates))


def roofline_rows(gemm_result: dict, step_s: dict[tuple[str, str], float]) -> list[dict]:
    """One row per (system, dtype) with a step time in ``step_s`` and a rate measurement."""
    gemms = gemm_result["gemms"]
    flops = sum(g["flops"] for g in gemms)
    rows = []
    for dtype, rates in gemm_result["rates"].items():
        bound = gemm_bound_s(gemms, rates)
        for system in ROOFLINE_SYSTEMS:
            seconds = step_s.get((system, dtype))
            if not seconds:
                continue
            rows.append(
                dict(
                    system=system,
                    dtype=dtype,
                    step_s=seconds,
                    gflop=flops / 1e9,
                    achieved_gflops=flops / seconds / 1e9,
                    bound_s=bound,
                    bound_gflops=flops / bound / 1e9,
                    fraction=bound / seconds,
                )
            )
    return rows


def group_rows(gemm_result: dict) -> list[dict]:
    """Per group of products: FLOPs per step and, per dtype, the GEMM-bound time and effective rate."""
    gemms, out = gemm_result["gemms"], []
    for group in GROUPS:
        idx = [i for i, g in enumerate(gemms) if g["group"] == group]
        flops = sum(gemms[i]["flops"] for i in idx)
        bound = {d: sum(gemms[i]["flops"] / r[i] for i in idx) for d, r in gemm_result["rates"].items()}
        out.append(dict(group=group, gflop=flops / 1e9, bound_s=bound))
    return out


def render(gemm_result: dict | None, rows: list[dict], labels: dict, fmt) -> list[str]:
    """The Markdown lines of the roofline section."""
    if not gemm_result:
        return []
    dtypes = list(gemm_result["rates"])
    L = ["## Roofline: measured step time against the GEMM-bound time\n"]
    L.append(
        f"The matrix products of one step at the main workload (forward + backward; the LM head over the scored "
        f"positions only), their FLOPs, and this machine's rate for each, measured in this run with "
        f"{gemm_result['threads']} torch thread(s) on {gemm_result['device']} (`torch.matmul` at that shape, operand "
        "layout and dtype; best of 3). GEMM-bound time = sum of FLOPs / rate. Fraction = GEMM-bound time / measured "
        "step time. How FLOPs are counted: `benchmarks/roofline.py`, `benchmarks/README.md`.\n"
    )
    L.append(
        "| system | dtype | s/step | GFLOP/step (counted) | achieved GFLOP/s | GEMM-bound s | GEMM-bound GFLOP/s | fraction of GEMM bound |"
    )
    L.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        L.append(
            f"| {labels.get(r['system'], r['system'])} | {r['dtype']} | {fmt(r['step_s'], 4)} | {r['gflop']:.4g} | "
            f"{fmt(r['achieved_gflops'], 1)} | {fmt(r['bound_s'], 4)} | {fmt(r['bound_gflops'], 1)} | "
            f"{fmt(r['fraction'], 3)} |"
        )
    L.append("")
    L.append("Per group of products (GEMM-bound seconds per step, and the group's effective rate):\n")
    L.append("| group | GFLOP/step | " + " | ".join(f"{d} bound s | {d} GFLOP/s" for d in dtypes) + " |")
    L.append("| --- | ---: | " + " | ".join("---: | ---:" for _ in dtypes) + " |")
    for g in group_rows(gemm_result):
        cells = [
            f"{fmt(g['bound_s'][d], 4)} | {fmt(g['gflop'] / g['bound_s'][d] if g['bound_s'][d] else None, 1)}"
            for d in dtypes
        ]
        L.append(f"| {g['group']} | {g['gflop']:.4g} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("Each product (count = per step; attention counted at the causal fraction of its FLOPs):\n")
    L.append(
        "| product | (batch x) m x k @ k x n | layout | count | GFLOP/step | "
        + " | ".join(f"{d} GFLOP/s" for d in dtypes)
        + " |"
    )
    L.append("| --- | --- | --- | ---: | ---: | " + " | ".join("---:" for _ in dtypes) + " |")
    for i, g in enumerate(gemm_result["gemms"]):
        shape = (f"{g['batch']} x " if g["batch"] > 1 else "") + f"{g['m']} x {g['k']} @ {g['k']} x {g['n']}"
        rates = " | ".join(fmt(gemm_result["rates"][d][i] / 1e9, 1) for d in dtypes)
        L.append(f"| {g['name']} | {shape} | {g['layout']} | {g['count']} | {g['flops'] / 1e9:.4g} | {rates} |")
    L.append("")
    return L
