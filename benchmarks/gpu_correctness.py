"""Correctness of the CUDA path, for gpu_check.py: the same model, weights and batch on the device
and on the CPU.

``head_check``: TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, Triton on CUDA: what
mallowspo's completion head runs there) on the device against mallowspo's CPU head
(``training.head.completion_scores``) in float32: per-token log-probs and entropies, and the
gradients of the summed log-probs,

- in float32 on both (TF32 off): float32 rounding only, ``FP32_TOL``;
- in bf16 autocast on the device: within ``bf16_bounds``, the rounding bound of
  tests/training/test_bf16.py (bf16's 2^-8 on every logit, widened by the deviation the backbone's
  bf16 leaves in the hidden states, measured here).

It also checks that mallowspo's patched model on the device dispatches to TRL's head (same values).

``step_check``: one MallowsPO-phi step (-log phi(x) = 0.7 for every pair) through ``MallowsPOTrainer.compute_loss`` and backward on
the device and on the CPU, float32, the same batch: loss and every parameter's gradient.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

U = 2.0**-8  # bf16's relative rounding of a product of two rounded numbers (see test_bf16.py)
FP32_TOL = dict(log_probs=1e-3, entropy=1e-3, grad_rel=1e-3)  # absolute nats; relative gradient norm
STEP_TOL = dict(loss_abs=1e-4, loss_rel=1e-4, grad_rel=1e-3, ref_logps_abs=2e-2)


def _load(assets: Path, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32).to(device).eval()


def _batch(assets: Path, pairs: int) -> dict:
    from mallowspo.training.collate import PreferenceCollator

    rows = json.loads((assets / "pairs.json").read_text())[:pairs]
    rows = [
        {
            "prompt_input_ids": r["prompt_ids"],
            "chosen_input_ids": r["chosen_ids"],
            "rejected_input_ids": r["rejected_ids"],
        }
        for r in rows
    ]
    batch = PreferenceCollator(pad_token_id=0)(rows)
    batch["labels"] = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return batch


def bf16_bounds(hidden, weight, hidden_error):
    """(rows,) bounds on |d log p_t| and |dH| of a bf16 head against the exact one (test_bf16.py's):
    eps_v = U (sum_i |h_i w_vi| + |z_v|) + sum_i |dh_i| |w_vi|; |d log p| <= 2 max eps;
    |dH| <= 2 max eps E_p|z - E_p z|."""
    h, w = hidden.double(), weight.double()
    z = h @ w.t()
    p = torch.softmax(z, dim=-1)
    eps = U * (h.abs() @ w.abs().t() + z.abs()) + hidden_error.double().abs() @ w.abs().t()
    spread = (p * (z - (p * z).sum(-1, keepdim=True)).abs()).sum(-1)
    max_eps = eps.amax(-1)
    return 2 * max_eps + 1e-5, 2 * max_eps * spread + 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def head_check(assets: Path, device: str, pairs: int = 4) -> dict:
    """See the module docstring; returns the measured errors, their bounds and a verdict per check."""
    from trl.trainer.utils import add_fused_lm_head

    import mallowspo.training.head as head_module
    from mallowspo.training.head import add_completion_head

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    batch = _batch(assets, pairs)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    mask = batch["labels"][:, 1:] != -100

    ours = _load(assets, "cpu")
    add_completion_head(ours)
    out = ours(**inputs, completion_head=True, with_entropy=True)
    out.log_probs.sum().backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}

    trl = _load(assets, device)
    add_fused_lm_head(trl, outputs=("log_probs", "entropy"))
    dev_inputs = {k: v.to(device) for k, v in inputs.items()}
    result = {
        "device": device,
        "triton_path": head_module._triton_device(torch.device(device)),
        "scored": int(mask.sum()),
    }

    # float32 on both sides
    ref = trl(**dev_inputs, fused_lm_head=True)
    ref.log_probs.sum().backward()
    lp_err = float((ref.log_probs.cpu() - out.log_probs)[mask].abs().max())
    ent_err = float((ref.entropy.cpu() - out.entropy)[mask].abs().max())
    trl_grads = {n: p.grad.cpu() for n, p in trl.named_parameters() if p.grad is not None}
    assert set(trl_grads) == set(ours_grads), sorted(set(trl_grads) ^ set(ours_grads))
    grad_err = max(_rel(trl_grads[n], g) for n, g in ours_grads.items())
    result["fp32"] = dict(
        log_probs_max_abs=lp_err,
        entropy_max_abs=ent_err,
        grad_max_rel=grad_err,
        ok=lp_err <= FP32_TOL["log_probs"] and ent_err <= FP32_TOL["entropy"] and grad_err <= FP32_TOL["grad_rel"],
    )

    # bf16 autocast on the device, against float32 on the CPU
    with torch.no_grad():
        cpu_inputs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        hidden = ours.base_model(**cpu_inputs).last_hidden_state[:, :-1]
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            ref16 = trl(**dev_inputs, fused_lm_head=True)
            dev_hidden = trl.base_model(**{k: dev_inputs[k] for k in cpu_inputs}).last_hidden_state[:, :-1]
    lp_bound, ent_bound = bf16_bounds(
        hidden[mask], ours.get_output_embeddings().weight.detach(), (dev_hidden.float().cpu() - hidden)[mask]
    )
    lp16 = (ref16.log_probs.float().cpu() - out.log_probs.detach())[mask].double().abs()
    ent16 = (ref16.entropy.float().cpu() - out.entropy.detach())[mask].double().abs()
    result["bf16"] = dict(
        log_probs_max_abs=float(lp16.max()),
        log_probs_max_bound=float(lp_bound.max()),
        log_probs_worst_error_over_bound=float((lp16 / lp_bound).max()),
        entropy_max_abs=float(ent16.max()),
        entropy_worst_error_over_bound=float((ent16 / ent_bound).max()),
        dtypes=[str(ref16.log_probs.dtype), str(ref16.entropy.dtype)],
        ok=bool((lp16 <= lp_bound).all() and (ent16 <= ent_bound).all()),
    )

    # mallowspo's own patched model on the device takes TRL's head (on CUDA with Triton)
    mine = _load(assets, device)
    add_completion_head(mine)
    with torch.no_grad():
        theirs = trl(**dev_inputs, fused_lm_head=True)
        again = mine(**dev_inputs, completion_head=True, with_entropy=True)
    diff = float((theirs.log_probs - again.log_probs).abs().max())
    same = diff <= 1e-5  # the same kernels on the same inputs (atomics-free: equal up to reduction order)
    result["dispatch"] = dict(equal_to_trl=same, max_abs_diff=diff, ok=same or not result["triton_path"])
    result["ok"] = result["fp32"]["ok"] and result["bf16"]["ok"] and result["dispatch"]["ok"]
    return result


def _trainer(assets: Path, w, device: str, output_dir: str):
    import datasets
    from transformers import AutoTokenizer

    from mallowspo.training.config import MallowsPOConfig
    from mallowspo.training.trainer import MallowsPOTrainer

    rows = [json.loads(line) for line in (assets / "data.jsonl").read_text().splitlines() if line.strip()]
    args = MallowsPOConfig(
        output_dir=output_dir,
        use_cpu=device == "cpu",
        bf16=False,
        per_device_train_batch_size=w.batch_pairs,
        max_length=w.max_length,
        max_prompt_length=w.prompt_len,
        mallows="phi",
        dispersion_source="constant",  # a random-init model's entropies give no dispersion: L(x) = 0.7 for all
        dispersion_constant=0.7,
        precompute_ref_log_probs=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=w.seed,
        dataloader_pin_memory=False,
    )
    return MallowsPOTrainer(
        model=_load(assets, "cpu").train(),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(assets / "model"),
    )


def step_check(assets: Path, w, device: str) -> tuple[dict, object, dict]:
    """See the module docstring. Returns (result, the device trainer, its batch) for the kernel count."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    runs = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        os.environ["MALLOWSPO_CACHE"] = str(Path(tmp) / "cache")
        for where in ("cpu", device):
            trainer = _trainer(assets, w, where, str(Path(tmp) / where))
            if "batch" not in runs:
                batch = next(iter(trainer.get_train_dataloader()))
                # The policy is the reference at step 0 (Delta = 0: only the link's cubic patch); shifted
                # reference log-probs put beta * Delta across [-0.8, 0.8], inside and outside the patch.
                pairs = batch["ref_chosen_logps"].numel()
                batch["ref_chosen_logps"] = batch["ref_chosen_logps"] - torch.linspace(-8.0, 8.0, pairs)
                runs["batch"] = batch
            batch = {k: v.to(trainer.args.device) if torch.is_tensor(v) else v for k, v in runs["batch"].items()}
            model = trainer.model
            model.train()
            model.zero_grad(set_to_none=True)
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(model, batch)
            loss.backward()
            runs[where] = dict(
                trainer=trainer,
                batch=batch,
                loss=float(loss),
                grads={n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None},
                ref=torch.tensor(
                    [*trainer.train_dataset["ref_chosen_logps"], *trainer.train_dataset["ref_rejected_logps"]]
                ),
            )
    cpu, dev = runs["cpu"], runs[device]
    loss_err = abs(dev["loss"] - cpu["loss"])
    grad_err = max(_rel(dev["grads"][n], g) for n, g in cpu["grads"].items())
    ref_err = float((dev["ref"] - cpu["ref"]).abs().max())
    ok = (
        loss_err <= STEP_TOL["loss_abs"] + STEP_TOL["loss_rel"] * abs(cpu["loss"])
        and grad_err <= STEP_TOL["grad_rel"]
        and ref_err <= STEP_TOL["ref_logps_abs"]
        and set(dev["grads"]) == set(cpu["grads"])
    )
    result = dict(
        device=device,
        loss_cpu=cpu["loss"],
        loss_device=dev["loss"],
        loss_abs_error=loss_err,
        grad_max_rel_error=grad_err,
        parameters=len(cpu["grads"]),
        ref_logps_max_abs_error=ref_err,
        ok=ok,
    )
    return result, dev["trainer"], dev["batch"]
