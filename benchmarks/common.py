"""Shared pieces of the benchmark harness: the workload, the on-disk assets every system
loads (one random-init Llama, one word-level tokenizer, one preference data set), and the
small measurement helpers (threads, device, peak memory).

Every system measured by ``run.py`` reads the same assets, so all of them train the same
weights on the same tokens with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import statistics
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

PAD, EOS, BOS = "<|pad|>", "<|end|>", "<|begin|>"
SPECIALS = (PAD, EOS, BOS)


@dataclass(frozen=True)
class Workload:
    """One model + data shape. Every system in a run is measured on the same Workload."""

    vocab_size: int = 32768
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    prompt_len: int = 64  # tokens, every prompt
    response_len: int = 128  # tokens, every chosen and rejected response, EOS included
    batch_pairs: int = 4  # preference pairs per optimizer step (2x sequences per forward)
    n_pairs: int = 16  # distinct pairs in the data set (4 batches); the trainers cycle over it
    learning_rate: float = 1e-6
    beta: float = 0.1
    phi_star: float = 0.29  # fixed dispersion normalisation (the authors' constant), same for all
    seed: int = 0
    # Length-skewed data: in every run of batch_pairs pairs one has the full lengths and the others an
    # eighth of them (padded batches are then mostly padding; padding_free packs only the real tokens).
    skewed: bool = False
    # Responses per prompt. Above 2 the assets also hold ranked lists of list_size responses (lists.jsonl),
    # and the pairs are each list's best against its worst response, for the same prompts.
    list_size: int = 2

    @property
    def max_length(self) -> int:
        return self.prompt_len + self.response_len

    def parameter_count(self) -> int:
        """Parameters of the Llama this describes (untied head; no biases)."""
        h, head_dim = self.hidden_size, self.hidden_size // self.num_heads
        attention = 2 * h * h + 2 * h * self.num_kv_heads * head_dim
        layer = attention + 3 * h * self.intermediate_size + 2 * h
        return 2 * self.vocab_size * h + self.num_layers * layer + h

    def key(self) -> str:
        fields = asdict(self)
        if self.list_size == 2:
            del fields["list_size"]  # the keys of pair workloads predate the field
        blob = json.dumps(fields, sort_keys=True).encode()
        return f"v{self.vocab_size}_p{self.prompt_len}_r{self.response_len}_" + hashlib.sha1(blob).hexdigest()[:8]

    def describe(self) -> str:
        kv = f" ({self.num_kv_heads} key-value heads)" if self.num_kv_heads != self.num_heads else ""
        lengths = f"{self.prompt_len} prompt + {self.response_len} response tokens"
        if self.skewed:
            lengths = f"up to {lengths}, one pair in {self.batch_pairs} full length and the others 1/8 of it"
        lists = (
            f"; ranked lists of {self.list_size} responses per prompt ({self.list_size * self.batch_pairs} "
            "sequences per listwise step), the pairs their best against their worst"
            if self.list_size > 2
            else ""
        )
        return (
            f"Llama, vocab {self.vocab_size}, hidden {self.hidden_size}, {self.num_layers} layers, "
            f"{self.num_heads} heads{kv}, MLP {self.intermediate_size}, untied LM head, "
            f"{self.parameter_count() / 1e6:.1f} M parameters; "
            f"{self.batch_pairs} pairs/step (= {2 * self.batch_pairs} sequences of {lengths}){lists}"
        )

    def pair_lengths(self, index: int) -> tuple[int, int]:
        """(prompt, response) tokens of pair ``index`` (``skewed``: see the field)."""
        if self.skewed and index % self.batch_pairs:
            return max(2, self.prompt_len // 8), max(2, self.response_len // 8)
        return self.prompt_len, self.response_len

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Workload:
        return cls(**data)

    def with_(self, **changes) -> Workload:
        return replace(self, **changes)


@dataclass
class Settings:
    """How a run measures (same for every system of the run)."""

    device: str = "cpu"  # "cpu" or "cuda"
    dtype: str = "fp32"  # "fp32" (no autocast) or "bf16" (autocast, fp32 master weights)
    threads: int = 1
    steps: int = 20
    warmup: int = 3
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Settings:
        return cls(**data)


# ----------------------------------------------------------------------------- assets


def word(token_id: int) -> str:
    """The text of a non-special token id in the benchmark tokenizer."""
    return f"w{token_id}"


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer: id i <-> the word ``w{i}``, specials first, no BOS/EOS added
    automatically. Text made of such words tokenizes to exactly the ids it was made from."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for i in range(len(SPECIALS), vocab_size):
        vocab[word(i)] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS, model_max_length=1 << 20
    )


def make_pairs(w: Workload) -> list[dict]:
    """Token-id preference pairs with exact lengths: prompt_len prompt tokens; chosen and
    rejected of response_len tokens each, the last one EOS (``skewed``: ``Workload.pair_lengths``).
    Ids avoid the special tokens. With ``list_size`` > 2: the best and worst response of each of
    ``make_lists``' lists."""
    if w.list_size > 2:
        return [list_pair(item) for item in make_lists(w)]
    rng = random.Random(w.seed)
    eos_id = SPECIALS.index(EOS)
    lo, hi = len(SPECIALS), w.vocab_size - 1

    def ids(n):
        return [rng.randint(lo, hi) for _ in range(n)]

    pairs = []
    for index in range(w.n_pairs):
        prompt_len, response_len = w.pair_lengths(index)
        chosen, rejected = ids(response_len - 1) + [eos_id], ids(response_len - 1) + [eos_id]
        if chosen == rejected:  # astronomically unlikely; keep the data valid anyway
            rejected[0] = lo + (rejected[0] - lo + 1) % (hi - lo + 1)
        pairs.append({"prompt_ids": ids(prompt_len), "chosen_ids": chosen, "rejected_ids": rejected})
    return pairs


def make_lists(w: Workload) -> list[dict]:
    """Token-id ranked lists, one per pair index, with the lengths of ``Workload.pair_lengths``: a prompt
    and ``list_size`` distinct responses (EOS last), ranked in their order (the first best)."""
    rng = random.Random(w.seed)
    eos_id = SPECIALS.index(EOS)
    lo, hi = len(SPECIALS), w.vocab_size - 1

    def ids(n):
        return [rng.randint(lo, hi) for _ in range(n)]

    lists = []
    for index in range(w.n_pairs):
        prompt_len, response_len = w.pair_lengths(index)
        responses = []
        for _ in range(w.list_size):
            response = ids(response_len - 1) + [eos_id]
            while response in responses:  # astronomically unlikely; keep the responses distinct
                response[0] = lo + (response[0] - lo + 1) % (hi - lo + 1)
            responses.append(response)
        lists.append({"prompt_ids": ids(prompt_len), "responses_ids": responses})
    return lists


def list_pair(item: dict) -> dict:
    """The token-id pair of a ranked list: its best response (the first) against its worst (the last)."""
    return {
        "prompt_ids": item["prompt_ids"],
        "chosen_ids": item["responses_ids"][0],
        "rejected_ids": item["responses_ids"][-1],
    }


def ids_text(ids) -> str:
    """The text of token ids in the benchmark tokenizer."""
    return " ".join(EOS if i == SPECIALS.index(EOS) else word(i) for i in ids)


def pair_text(pair: dict) -> dict:
    """The standard-format text row of a token-id pair (TRL concatenates prompt + completion,
    so completions start with a space). Completions already end with the EOS token."""
    return {
        "prompt": ids_text(pair["prompt_ids"]),
        "chosen": " " + ids_text(pair["chosen_ids"]),
        "rejected": " " + ids_text(pair["rejected_ids"]),
    }


def list_text(item: dict) -> dict:
    """The text row of a token-id list in mallowspo's ``responses`` layout (completions as ``pair_text``'s),
    ranked best first in the order of its responses."""
    return {
        "prompt": ids_text(item["prompt_ids"]),
        "responses": [" " + ids_text(r) for r in item["responses_ids"]],
        "ranking": list(range(len(item["responses_ids"]))),
    }


def model_key(w: Workload) -> str:
    """What the saved model depends on (not the data lengths, up to 2048 tokens): workloads that
    differ only in their data share one model directory."""
    fields = (w.vocab_size, w.hidden_size, w.intermediate_size, w.num_layers, w.num_heads, w.num_kv_heads)
    blob = json.dumps([*fields, w.seed, max(2048, w.max_length)]).encode()
    return "model_" + hashlib.sha1(blob).hexdigest()[:10]


def _save_model(w: Workload, model_dir: Path) -> None:
    """The random-init Llama of ``w`` and its tokenizer, saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = build_tokenizer(w.vocab_size)
    config = LlamaConfig(
        vocab_size=w.vocab_size,
        hidden_size=w.hidden_size,
        intermediate_size=w.intermediate_size,
        num_hidden_layers=w.num_layers,
        num_attention_heads=w.num_heads,
        num_key_value_heads=w.num_kv_heads,
        max_position_embeddings=max(2048, w.max_length),
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(w.seed)
    model = LlamaForCausalLM(config)
    # A random-init head gives near-uniform next-token distributions; a larger output scale
    # makes them peaked enough that entropies, log-ratios and the dispersion are not degenerate.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "DONE").write_text("ok\n")


def build_assets(w: Workload, root: Path) -> Path:
    """Write model (random init, saved with save_pretrained), tokenizer and data for ``w``
    under ``root/<w.key()>`` once; return that directory. The model and its tokenizer are written
    once per ``model_key`` under ``root/models`` and linked as ``model``."""
    out = Path(root) / w.key()
    if (out / "DONE").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    model_dir = (Path(root) / "models" / model_key(w)).resolve()
    if not (model_dir / "DONE").exists():
        _save_model(w, model_dir)
    if not (out / "model").exists():
        (out / "model").symlink_to(model_dir, target_is_directory=True)

    pairs = make_pairs(w)
    with open(out / "pairs.json", "w") as f:
        json.dump(pairs, f)
    with open(out / "data.jsonl", "w") as f:
        for pair in pairs:
            f.write(json.dumps(pair_text(pair)) + "\n")

    # The text must tokenize back to exactly the ids (what TRL and mallowspo will see).
    tokenizer = build_tokenizer(w.vocab_size)
    row, pair = pair_text(pairs[0]), pairs[0]
    assert tokenizer(row["prompt"]).input_ids == pair["prompt_ids"]
    assert tokenizer(row["prompt"] + row["chosen"]).input_ids == pair["prompt_ids"] + pair["chosen_ids"]
    if w.list_size > 2:
        _write_lists(w, out / "lists.jsonl", tokenizer)
    (out / "DONE").write_text("ok\n")
    return out


def _write_lists(w: Workload, path: Path, tokenizer) -> None:
    """The ranked lists of ``w`` as text rows (``list_text``), checked to tokenize back to their ids."""
    lists = make_lists(w)
    with open(path, "w") as f:
        for item in lists:
            f.write(json.dumps(list_text(item)) + "\n")
    row, item = list_text(lists[0]), lists[0]
    for text, ids in zip(row["responses"], item["responses_ids"]):
        assert tokenizer(row["prompt"] + text).input_ids == item["prompt_ids"] + ids


# ----------------------------------------------------------------------------- measurement helpers


def configure_threads(threads: int) -> None:
    """Same intra-op thread count in every worker (the env vars are set by run.py too)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set (in-process smoke runs)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (MiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def batch_fingerprint(input_ids, completion_mask=None) -> dict:
    """Shape and checksums of a concatenated batch, to check every system saw the same tokens (without
    a completion mask its completion figures are 0)."""
    ids = input_ids.detach().cpu().long()
    mask = completion_mask.detach().cpu().long() if completion_mask is not None else ids.new_zeros(ids.shape)
    return {
        "shape": list(ids.shape),
        "id_sum": int(ids.sum()),
        "completion_tokens": int(mask.sum()),
        "completion_id_sum": int((ids * mask).sum()),
    }


def batch_layout(batch: dict) -> dict:
    """How a collated batch is laid out: the sequences it computes, its real (non-padding) tokens and
    the tokens of its tensors (padded rows: rows x longest; a packed row: only the real ones)."""
    ids = batch["input_ids"]
    if "cu_seq_lens" in batch:  # padding-free: one row of the sequences back to back
        sequences, real = int(batch["cu_seq_lens"].numel()) - 1, int(ids.numel())
    else:
        mask = batch.get("attention_mask")
        sequences, real = int(ids.shape[0]), int(mask.sum()) if mask is not None else int(ids.numel())
    return {"sequences": sequences, "real_tokens": real, "padded_tokens": int(ids.numel())}


# ----------------------------------------------------------------------------- report helpers


def paired_ratio(summary: dict, a: str, b: str):
    """Step-time ratio a/b: the median of the per-round ratios (each round measures both
    systems close in time), with the per-round values as the spread."""
    if a not in summary or b not in summary:
        return None, []
    ra, rb = summary[a].get("round_medians", []), summary[b].get("round_medians", [])
    rounds = [x / y for x, y in zip(ra, rb) if x is not None and y]
    return median(rounds), rounds


def memory_ratio(summary: dict, a: str, b: str):
    pa, pb = summary.get(a, {}).get("peak_mib"), summary.get(b, {}).get("peak_mib")
    return (pa / pb) if pa and pb else None


def fmt(value, digits=3, suffix=""):
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def target_row(what, value, op, bound, spread=(), note="") -> dict:
    """One row of the targets table: PASS when ``value op bound`` holds (op "<=" or ">="), n/a without a value."""
    if value is None:
        verdict = "n/a"
    else:
        verdict = "PASS" if (value <= bound if op == "<=" else value >= bound) else "FAIL"
    return dict(what=what, value=value, target=f"{op} {bound:.2f}", verdict=verdict, spread=list(spread), note=note)
