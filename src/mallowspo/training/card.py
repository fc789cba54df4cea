"""The model card a run writes to ``output_dir/README.md``, in the hub's format: YAML metadata
(``base_model`` and ``datasets`` when they are hub ids, ``library_name``, ``tags``), a "Use"
snippet that runs as written, the method, data and dispersion, the last logged metrics, the
framework versions and the citations. ``render_model_card`` formats plain facts;
``model_card_facts`` gathers them from a trainer.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import ModelCardData
from trl.trainer.utils import get_config_model_id

from mallowspo.training.data import looks_like_path
from mallowspo.training.models import REFERENCE_KINDS, is_peft_model
from mallowspo.training.outputs import summary_statistics

MODEL_CARD_FILE = "README.md"


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


PAPER_BIBTEX = """@inproceedings{chen2025mallowspo,
  title         = {{MallowsPO: Fine-Tune Your LLM with Preference Dispersions}},
  author        = {Chen, Haoxian and Zhao, Hanyang and Lam, Henry and Yao, David and Tang, Wenpin},
  booktitle     = {The Thirteenth International Conference on Learning Representations (ICLR)},
  year          = {2025},
  eprint        = {2405.14953},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2405.14953}
}"""
# As TRL's own model cards cite it (trl/templates/lm_model_card.md).


TRL_BIBTEX = """@software{vonwerra2020trl,
  title   = {{TRL: Transformers Reinforcement Learning}},
  author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
  license = {Apache-2.0},
  url     = {https://github.com/huggingface/trl},
  year    = {2020}
}"""
# The distributions whose versions a card lists (as TRL's cards do), by the name it shows.


FRAMEWORKS = {
    "mallowspo": "mallowspo",
    "TRL": "trl",
    "Transformers": "transformers",
    "PyTorch": "torch",
    "Datasets": "datasets",
    "Tokenizers": "tokenizers",
}


USE_PROMPT = "Write a short poem about the sea."


def loss_types(loss_type: str | list[str]) -> list[str]:
    """``loss_type`` as a list of terms (TRL's list form; a single name is one term)."""
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def method_name(loss_type: str | list[str], mallows: str) -> str:
    """A readable name for the objective, e.g. 'MallowsPO-phi', 'robust + Mallows-theta' or, for
    a list of terms, 'MallowsPO-phi + sft' (the dispersion modifies the preference terms only)."""
    terms = loss_types(loss_type)
    if len(terms) > 1:
        return " + ".join(term if term == "sft" else method_name(term, mallows) for term in terms)
    (term,) = terms
    if (term, mallows) in METHOD_NAMES:
        return METHOD_NAMES[(term, mallows)]
    return term if mallows == "none" else f"{term} + Mallows-{mallows}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def hub_id(name: str | None) -> str | None:
    """``name`` when it is a hub id ('owner/name'), None for a local path: the hub's card metadata
    (``base_model``, ``datasets``) holds only ids it can link to."""
    if not name or Path(name).expanduser().exists() or looks_like_path(name):
        return None
    return name


def tag_of(method: str) -> str:
    """A hub tag for a method name: 'MallowsSimPO (theta)' -> 'mallowssimpo-theta'."""
    return re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-")


def card_metadata(facts: dict[str, Any], method: str) -> str:
    """The card's YAML front matter, as ``huggingface_hub.ModelCardData`` writes it (TRL's fields)."""
    adapter = facts.get("adapter")
    tags = ["generated_from_trainer", "mallowspo", "preference-optimization", tag_of(method)]
    data = ModelCardData(
        base_model=hub_id(facts.get("base_model")),
        datasets=[name] if (name := hub_id(facts.get("dataset"))) else None,
        library_name="peft" if adapter else "transformers",
        model_name=facts.get("model_name"),
        tags=tags + (["lora"] if adapter else []),
    )
    return f"---\n{data.to_yaml()}\n---"


def framework_versions(peft: bool = False) -> dict[str, str]:
    """Display name -> installed version of the libraries a run used (PEFT only for an adapter)."""
    names = {**FRAMEWORKS, **({"PEFT": "peft"} if peft else {})}
    versions = {}
    for shown, distribution in names.items():
        try:
            versions[shown] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def method_lines(config: dict[str, Any], method: str) -> list[str]:
    terms = loss_types(config["loss_type"])
    weights = f", `loss_weights={config['loss_weights']}`" if config.get("loss_weights") else ""
    lines = [
        f"- objective: `loss_type={','.join(terms)}`{weights}, `mallows={config['mallows']}` ({method}), "
        f"beta = {_fmt(config['beta'])}",
    ]
    if config["mallows"] == "phi":
        lines.append(f"- phi link smoothing: `{config['phi_smoothing']}`, eps = `{config['smoothing_eps']}`")
    if "simpo" in terms:
        lines.append(f"- SimPO margin gamma = {_fmt(config['simpo_gamma'])}, length-normalised log-probs")
    if config.get("label_smoothing"):
        lines.append(f"- label smoothing = {_fmt(config['label_smoothing'])}")
    return lines + [
        f"- reference log-probs: {'precomputed once' if config['precompute_ref_log_probs'] else 'computed each step'}",
        f"- optimisation: lr {_fmt(config['learning_rate'])}, {config['lr_scheduler_type']} schedule, "
        f"per-device batch {config['per_device_train_batch_size']} x accumulation "
        f"{config['gradient_accumulation_steps']}, seed {config['seed']}",
    ]


def adapter_lines(adapter: dict[str, Any], base_model: str) -> list[str]:
    """What the adapter is, and where it finds its base model."""
    lines = [
        f"- {adapter['kind']}: r = {adapter['r']}, alpha = {adapter['lora_alpha']}, "
        f"target modules `{adapter['target_modules']}`"
    ]
    if adapter.get("modules_to_save"):
        lines.append(f"- trained in full and saved with the adapter: `{adapter['modules_to_save']}`")
    return lines + [
        f"- base model: `{adapter.get('base_model_name_or_path') or base_model}` (adapter_config.json's "
        "`base_model_name_or_path`: a hub id, or an absolute path)"
    ]


def data_lines(config: dict[str, Any], data: dict[str, str]) -> list[str]:
    lines = [
        f"- max_length {config['max_length']}, max_prompt_length {config['max_prompt_length']}, "
        f"max_completion_length {config['max_completion_length']}",
    ]
    return lines + [f"- {name}: {summary}" for name, summary in data.items()]


def dispersion_lines(dispersion: dict[str, Any] | None) -> list[str]:
    if dispersion is None:
        return ["No dispersion was computed (no reference pass ran for this objective)."]
    entropy = dispersion["source"] == "entropy"
    return [
        f"- source: `{dispersion['source']}`"
        + (
            f", phi* = {_fmt(dispersion['phi_star'])} (normalisation `{dispersion['normalization']}`), "
            f"clamp {dispersion['clamp']}"
            if entropy
            else ""
        ),
        f"- entropy model: {dispersion.get('entropy_model', 'the reference model')}",
        "- per-example values: `dispersion.jsonl` (row_index, prompt, hbar, neg_log_phi, mean entropies)",
        "",
        "| statistic of -log phi(x) | value |",
        "|---|---|",
        *[f"| {key} | {_fmt(value)} |" for key, value in dispersion["summary"].items()],
    ]


def use_snippet(facts: dict[str, Any]) -> list[str]:
    """Python that loads the saved model (an adapter with its base through peft) and generates:
    from the output directory's absolute path, so that it runs as written from anywhere."""
    hub = facts.get("hub_model_id")
    where = f'  # or, once pushed, "{hub}"' if hub else "  # this run's output directory, or its hub id once pushed"
    if facts.get("adapter"):
        loader = ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", ""]
        load = "model = AutoPeftModelForCausalLM.from_pretrained(model_id)  # the base model, then the adapter"
    else:
        loader = ["from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
        load = "model = AutoModelForCausalLM.from_pretrained(model_id)"
    if facts.get("chat_template", True):
        prompt = [
            f'messages = [{{"role": "user", "content": "{USE_PROMPT}"}}]',
            "inputs = tokenizer.apply_chat_template(",
            '    messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"',
            ").to(model.device)",
        ]
    else:
        prompt = [f'inputs = tokenizer("{USE_PROMPT}", return_tensors="pt").to(model.device)']
    return [
        "```python",
        *loader,
        f"model_id = {json.dumps(str(facts['model_path']))}{where}",
        "tokenizer = AutoTokenizer.from_pretrained(model_id)",
        load,
        "",
        *prompt,
        "output = model.generate(**inputs, max_new_tokens=64)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))',
        "```",
    ]


def citation_lines() -> list[str]:
    return [
        "Cite MallowsPO as:",
        "",
        "```bibtex",
        PAPER_BIBTEX,
        "```",
        "",
        "Cite TRL, whose trainer conventions and utilities mallowspo builds on, as:",
        "",
        "```bibtex",
        TRL_BIBTEX,
        "```",
    ]


def render_model_card(facts: dict[str, Any]) -> str:
    """README.md text from ``facts``: keys ``base_model``, ``dataset``, ``config`` (the
    MallowsPOConfig as a dict), ``data`` (rows, validation summary), ``dispersion``
    (settings and ``summary``), ``metrics`` (last logged values), ``model_path`` (the absolute
    output directory), ``hub_model_id``, ``chat_template`` (whether the tokenizer has one),
    ``adapter`` (the LoRA settings, or None) and ``versions`` (``framework_versions``)."""
    config = facts["config"]
    method = method_name(config["loss_type"], config["mallows"])
    adapter = facts.get("adapter")
    what = f"a {adapter['kind']} adapter" if adapter else "a fine-tuned model"
    lines = [
        card_metadata(facts, method),
        "",
        f"# {facts.get('model_name', 'Model')} fine-tuned with {method}",
        "",
        f"This is {what} of `{facts.get('base_model', 'unknown')}`, trained on `{facts.get('dataset', 'unknown')}` "
        f"with [mallowspo](https://arxiv.org/abs/2405.14953), an implementation of {PAPER}.",
        "",
        "## Use",
        "",
        *use_snippet(facts),
        "",
        "## Method",
        "",
        *method_lines(config, method),
    ]
    if adapter:
        lines += ["", "## Adapter", "", *adapter_lines(adapter, facts.get("base_model", "unknown"))]
    lines += ["", "## Data", "", *data_lines(config, facts.get("data", {}))]
    lines += ["", "## Dispersion", "", *dispersion_lines(facts.get("dispersion"))]
    metrics = facts.get("metrics") or {}
    if metrics:
        lines += ["", "## Last logged metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_fmt(value)} |" for key, value in metrics.items()]
    versions = facts.get("versions") or framework_versions(bool(adapter))
    lines += ["", "### Framework versions", "", *[f"- {name}: {version}" for name, version in versions.items()]]
    lines += ["", "## Citations", "", *citation_lines(), ""]
    return "\n".join(lines)


def write_model_card(output_dir: str | Path, facts: dict[str, Any]) -> Path:
    """Write ``render_model_card(facts)`` to ``output_dir/README.md``; returns the path."""
    path = Path(output_dir) / MODEL_CARD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_model_card(facts))
    return path


def adapter_facts(model: torch.nn.Module) -> dict[str, Any] | None:
    """The active adapter's settings (kind: LoRA, DoRA or rsLoRA; rank, alpha, modules), or None."""
    if not is_peft_model(model):
        return None
    config = model.peft_config[model.active_adapter]
    variants = [
        name for name, flag in (("DoRA", "use_dora"), ("rsLoRA", "use_rslora")) if getattr(config, flag, False)
    ]
    kind = " + ".join(variants) or str(getattr(config, "peft_type", "LoRA")).split(".")[-1].replace("LORA", "LoRA")

    def listed(value: Any) -> Any:
        return sorted(value) if isinstance(value, (set, frozenset)) else value

    return {
        "kind": kind,
        "r": getattr(config, "r", None),
        "lora_alpha": getattr(config, "lora_alpha", None),
        "target_modules": listed(getattr(config, "target_modules", None)),
        "modules_to_save": listed(getattr(config, "modules_to_save", None)),
        "base_model_name_or_path": config.base_model_name_or_path,
    }


def model_card_facts(trainer: Any) -> dict[str, Any]:
    """The facts ``render_model_card`` formats, from a ``MallowsPOTrainer``: its settings, run
    metadata, validation reports, last logged metrics, the adapter, the installed versions and
    the train split's dispersion."""
    args, metadata = trainer.args, trainer.run_metadata
    model = trainer.accelerator.unwrap_model(trainer.model)
    adapter = adapter_facts(model)
    facts: dict[str, Any] = {
        "model_name": Path(args.output_dir).name,
        "model_path": str(Path(args.output_dir).expanduser().resolve()),
        "hub_model_id": args.hub_model_id,
        "base_model": metadata.get("model", {}).get("model_name_or_path") or get_config_model_id(model.config),
        "dataset": metadata.get("data", {}).get("dataset_name", "unknown"),
        "config": args.to_dict(),
        "data": {name: report.summary().splitlines()[0] for name, report in trainer.validation_reports.items()},
        "metrics": trainer.last_logged_metrics(),
        "adapter": adapter,
        "chat_template": bool(getattr(trainer.processing_class, "chat_template", None)),
        "versions": framework_versions(peft=adapter is not None),
    }
    train = trainer.train_dataset
    if train is not None and "neg_log_phi" in train.column_names:
        facts["dispersion"] = {
            "source": args.dispersion_source,
            "normalization": args.dispersion_normalization,
            "phi_star": trainer.phi_star,
            "clamp": args.dispersion_clamp,
            "entropy_model": REFERENCE_KINDS[trainer.reference_kind],
            "summary": summary_statistics(np.asarray(train["neg_log_phi"])),
        }
    return facts
