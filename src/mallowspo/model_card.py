"""The model card (README.md) and the resolved-config file written next to a trained model.

Both are plain text renderers of plain dicts: the trainer gathers the facts, this module
only formats them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

METHOD_NAMES = {
    ("sigmoid", "none"): "DPO",
    ("sigmoid", "theta"): "MallowsPO-theta",
    ("sigmoid", "phi"): "MallowsPO-phi",
    ("ipo", "none"): "IPO",
    ("ipo", "theta"): "MallowsIPO",
    ("simpo", "none"): "SimPO",
    ("simpo", "theta"): "MallowsSimPO (theta)",
    ("simpo", "phi"): "MallowsSimPO (phi)",
}

PAPER = "MallowsPO: Fine-Tune Your LLM with Preference Dispersions (Chen et al., ICLR 2025, arXiv 2405.14953)"


def method_name(loss_type: str, mallows: str) -> str:
    """A readable name for the objective, e.g. 'MallowsPO-phi' or 'robust + Mallows-theta'."""
    if (loss_type, mallows) in METHOD_NAMES:
        return METHOD_NAMES[(loss_type, mallows)]
    return loss_type if mallows == "none" else f"{loss_type} + Mallows-{mallows}"


def dispersion_summary(neg_log_phi: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation, range and quantiles of the per-example -log phi(x)."""
    values = np.asarray(neg_log_phi, dtype=np.float64)
    quantiles = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {
        "count": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        **{f"q{int(q * 100):02d}": float(v) for q, v in zip((0.05, 0.25, 0.5, 0.75, 0.95), quantiles)},
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def render_model_card(facts: dict[str, Any]) -> str:
    """README.md text from ``facts``: keys ``base_model``, ``dataset``, ``config`` (the
    MallowsPOConfig as a dict), ``data`` (rows, validation summary), ``dispersion``
    (settings and ``summary``), ``metrics`` (last logged values)."""
    config = facts["config"]
    method = method_name(config["loss_type"], config["mallows"])
    lines = [
        "---",
        yaml.safe_dump({"library_name": "transformers", "tags": ["mallowspo", "preference-optimization", method]},
                       sort_keys=False).strip(),
        "---",
        "",
        f"# {facts.get('model_name', 'Model')} fine-tuned with {method}",
        "",
        f"Base model: `{facts.get('base_model', 'unknown')}`. Preference data: `{facts.get('dataset', 'unknown')}`.",
        f"Trained with [mallowspo](https://arxiv.org/abs/2405.14953), an implementation of {PAPER}.",
        "",
        "## Method",
        "",
        f"- objective: `loss_type={config['loss_type']}`, `mallows={config['mallows']}` ({method}), "
        f"beta = {_fmt(config['beta'])}",
    ]
    if config["mallows"] == "phi":
        lines.append(f"- phi link smoothing: `{config['phi_smoothing']}`, eps = `{config['smoothing_eps']}`")
    if config["loss_type"] == "simpo":
        lines.append(f"- SimPO margin gamma = {_fmt(config['simpo_gamma'])}, length-normalised log-probs")
    if config.get("label_smoothing"):
        lines.append(f"- label smoothing = {_fmt(config['label_smoothing'])}")
    lines += [
        f"- reference log-probs: {'precomputed once' if config['precompute_ref_log_probs'] else 'computed each step'}",
        f"- optimisation: lr {_fmt(config['learning_rate'])}, {config['lr_scheduler_type']} schedule, "
        f"per-device batch {config['per_device_train_batch_size']} x accumulation "
        f"{config['gradient_accumulation_steps']}, seed {config['seed']}",
        "",
        "## Data",
        "",
        f"- max_length {config['max_length']}, max_prompt_length {config['max_prompt_length']}, "
        f"max_completion_length {config['max_completion_length']}",
    ]
    for name, summary in facts.get("data", {}).items():
        lines.append(f"- {name}: {summary}")
    dispersion = facts.get("dispersion")
    lines += ["", "## Dispersion", ""]
    if dispersion is None:
        lines.append("No dispersion was computed (no reference pass ran for this objective).")
    else:
        lines += [
            f"- source: `{dispersion['source']}`" + (
                f", phi* = {_fmt(dispersion['phi_star'])} (normalisation `{dispersion['normalization']}`), "
                f"clamp {dispersion['clamp']}" if dispersion["source"] == "entropy" else ""
            ),
            f"- entropy model: {dispersion.get('entropy_model', 'the reference model')}",
            "- per-example values: `dispersion.jsonl` (row_index, prompt, hbar, neg_log_phi, mean entropies)",
            "",
            "| statistic of -log phi(x) | value |",
            "|---|---|",
            *[f"| {key} | {_fmt(value)} |" for key, value in dispersion["summary"].items()],
        ]
    metrics = facts.get("metrics") or {}
    if metrics:
        lines += ["", "## Last logged metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_fmt(value)} |" for key, value in metrics.items()]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(PATH)", "tokenizer = AutoTokenizer.from_pretrained(PATH)",
              "```", ""]
    return "\n".join(lines)


def write_resolved_config(path: str | Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write ``sections`` (e.g. model, data, training) as YAML; values YAML cannot hold become strings."""
    path = Path(path)

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return str(value)

    path.write_text(yaml.safe_dump(plain(sections), sort_keys=False))
    return path
