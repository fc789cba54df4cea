"""Build the built-in world's base ("SFT") model from scratch: corpus -> tokenizer ->
small Llama trained as a language model of the corpus -> held-out evaluation.

Deterministic under ``WorldConfig.seed`` on a given machine and torch build (seeded data
order and initialisation; the thread count is fixed by ``WorldConfig.num_threads``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from mallowspo.experiments.world.corpus import make_corpus, make_prompts
from mallowspo.experiments.world.lm import document_nll, encode_document, train_language_model
from mallowspo.experiments.world.paths import WorldPaths
from mallowspo.testing.tiny import tiny_llama_config, train_tokenizer


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines the world's prompts, corpus and base model."""

    seed: int = 0
    test_fraction: float = 0.2  # share of titles held out from the corpus and from preference training
    max_titles: int | None = None  # None: all 16 x 24 titles
    docs_closed: int = 6  # corpus responses per closed prompt
    docs_open: int = 12  # corpus responses per open prompt (their grammar is larger)
    heldout_docs: int = 2  # per held-out prompt, for the perplexity evaluation
    vocab_size: int = 1024  # upper bound: BPE stops when every corpus word is one token
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    train_steps: int = 600
    batch_size: int = 64
    learning_rate: float = 1.5e-3
    warmup_steps: int = 100
    num_threads: int = 1  # one thread: reproducible, and robust on a shared machine (see docs/world.md)
    storage_dtype: str = "float16"  # weights on disk; loaded back as float32

    @classmethod
    def mini(cls, **overrides) -> WorldConfig:
        """A miniature world for tests: few titles, a tiny model, a few training steps."""
        fields = dict(
            max_titles=12, docs_closed=2, docs_open=3, heldout_docs=1, hidden_size=32,
            intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            train_steps=60, batch_size=16, learning_rate=1e-2, warmup_steps=5,
        )  # fmt: skip
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_dict(cls, fields: dict) -> WorldConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in known})

    def docs_per_prompt(self) -> dict[str, int]:
        return {"closed": self.docs_closed, "open": self.docs_open}


def load_world_config(root: str | Path) -> WorldConfig:
    """The ``WorldConfig`` a world directory was built with."""
    manifest = WorldPaths(Path(root)).manifest
    if not manifest.is_file():
        raise FileNotFoundError(f"no built world at {root} (missing {manifest}); run `mallowspo world build`")
    return WorldConfig.from_dict(json.loads(manifest.read_text())["config"])


def _unigram_nll(train_docs: list[list[int]], eval_docs: list[list[int]], vocab_size: int) -> float:
    """Total NLL (nats) of the predicted tokens of ``eval_docs`` under an add-one-smoothed
    unigram model of the training tokens (the baseline a real LM must beat)."""
    counts = Counter(t for d in train_docs for t in d)
    total = sum(counts.values()) + vocab_size
    return -sum(math.log((counts[t] + 1) / total) for d in eval_docs for t in d[1:])


def build_world_model(root: str | Path, config: WorldConfig = WorldConfig(), log=print) -> dict:
    """Build the corpus, tokenizer and base model into ``root``; return (and save) the report."""
    start, start_cpu = time.perf_counter(), time.process_time()
    paths = WorldPaths(Path(root))
    paths.root.mkdir(parents=True, exist_ok=True)
    stale_files = (paths.manifest, paths.train_file, paths.test_file, paths.data_report)
    for stale in (*stale_files, paths.train_lists_file, paths.test_lists_file):
        stale.unlink(missing_ok=True)  # a new model invalidates the old data; no manifest = not built
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        prompts = make_prompts(config.seed, config.test_fraction, config.max_titles)
        train_prompts = [p for p in prompts if p.split == "train"]
        test_prompts = [p for p in prompts if p.split == "test"]
        corpus = make_corpus(train_prompts, config.docs_per_prompt(), config.seed)
        eval_docs = {"closed": config.heldout_docs, "open": config.heldout_docs}
        heldout = make_corpus(test_prompts, eval_docs, config.seed + 1)  # new titles
        fresh = make_corpus(train_prompts, eval_docs, config.seed + 2)  # seen titles, new responses
        log(
            f"corpus: {len(corpus)} documents on {len(train_prompts)} prompts; "
            f"held out: {len(heldout)} on {len(test_prompts)}"
        )

        tokenizer = train_tokenizer((p + r for p, r in corpus), config.vocab_size)
        train_docs = [encode_document(tokenizer, p, r)[0] for p, r in corpus]
        heldout_docs = [encode_document(tokenizer, p, r)[0] for p, r in heldout]
        fresh_docs = [encode_document(tokenizer, p, r)[0] for p, r in fresh]

        model_config = tiny_llama_config(
            len(tokenizer),
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = LlamaForCausalLM(model_config)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model: {n_params:,} parameters, vocabulary {len(tokenizer)}; training {config.train_steps} steps")
        stats = train_language_model(
            model, train_docs, tokenizer.pad_token_id, config.train_steps, config.batch_size,
            config.learning_rate, config.warmup_steps, config.seed, log=log,
        )  # fmt: skip

        # Save in the storage dtype, then evaluate the model exactly as it is loaded back.
        model.to(getattr(torch, config.storage_dtype))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(paths.model_dir, safe_serialization=True)
        tokenizer.save_pretrained(paths.model_dir)
        # The config names float32, so a plain from_pretrained(path) upcasts the stored weights.
        config_file = paths.model_dir / "config.json"
        saved = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**saved, "dtype": "float32"}, indent=2) + "\n")
        model = LlamaForCausalLM.from_pretrained(paths.model_dir)

        nll, n_tokens = document_nll(model, heldout_docs, tokenizer.pad_token_id)
        unigram = _unigram_nll(train_docs, heldout_docs, len(tokenizer))
        fresh_nll, fresh_tokens = document_nll(model, fresh_docs, tokenizer.pad_token_id)
        size_bytes = sum(f.stat().st_size for f in paths.model_dir.iterdir() if f.is_file())
        report = {
            "config": dataclasses.asdict(config),
            "corpus": {
                "train_documents": len(corpus),
                "train_tokens": sum(len(d) for d in train_docs),
                "heldout_documents": len(heldout),
                "heldout_tokens": sum(len(d) for d in heldout_docs),
                "train_prompts": len(train_prompts),
                "heldout_prompts": len(test_prompts),
            },
            "model": {
                "parameters": n_params,
                "vocab_size": len(tokenizer),
                "directory_bytes": size_bytes,
                "storage_dtype": config.storage_dtype,
            },
            "training": dataclasses.asdict(stats),
            "evaluation": {
                "heldout_perplexity": math.exp(nll / n_tokens),
                "heldout_unigram_perplexity": math.exp(unigram / n_tokens),
                "seen_titles_perplexity": math.exp(fresh_nll / fresh_tokens),
                "seen_titles_unigram_perplexity": math.exp(
                    _unigram_nll(train_docs, fresh_docs, len(tokenizer)) / fresh_tokens
                ),
                "heldout_predicted_tokens": n_tokens,
            },
            "build_seconds": time.perf_counter() - start,
            "build_cpu_seconds": time.process_time() - start_cpu,  # wall time inflates on a shared machine
            "machine": {"torch": torch.__version__, "threads": config.num_threads, "platform": platform.platform()},
        }
        paths.manifest.write_text(json.dumps(report, indent=2) + "\n")
        log(
            f"held-out perplexity {report['evaluation']['heldout_perplexity']:.2f} "
            f"(unigram {report['evaluation']['heldout_unigram_perplexity']:.2f}); "
            f"{size_bytes / 1e6:.1f} MB; built in {report['build_seconds']:.0f}s"
        )
        return report
    finally:
        torch.set_num_threads(previous_threads)
