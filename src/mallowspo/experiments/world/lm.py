"""The world's base language model: tokenising documents, training, and the two passes
the rest of the world needs (teacher-forced statistics and sampling). Plain torch.

A document is prompt + response + end token, tokenised piecewise exactly as TRL tokenises
a standard preference example (prompt ids, then completion ids, then EOS), so the base
model has seen its inputs in the form the trainer will show them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase


def encode_document(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> tuple[list[int], int]:
    """(token ids of prompt + response + EOS, number of prompt tokens)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return prompt_ids + response_ids + [tokenizer.eos_token_id], len(prompt_ids)


def _pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


@dataclass(frozen=True)
class TrainStats:
    steps: int
    tokens_seen: int
    final_loss: float
    seconds: float


def train_language_model(
    model: torch.nn.Module,
    documents: list[list[int]],
    pad_id: int,
    steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int,
    seed: int,
    log_every: int = 100,
    log=print,
) -> TrainStats:
    """Next-token training on whole documents (right-padded batches of random documents, no
    packing), AdamW with linear warmup and cosine decay to 10% of the peak learning rate.

    Every token after the first of each document is predicted. Batches are drawn epoch by
    epoch from a seeded permutation, so the run is a function of ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return learning_rate * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    order: list[int] = []
    tokens_seen, running, start = 0, float("nan"), time.perf_counter()
    for step in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(len(documents), generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        ids, mask = _pad_right([documents[i] for i in batch], pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens_seen += int(mask[:, 1:].sum())
        value = loss.item()
        running = value if math.isnan(running) else 0.95 * running + 0.05 * value
        if log_every and (step + 1) % log_every == 0:
            log(f"  step {step + 1}/{steps}  loss {running:.3f}  ({time.perf_counter() - start:.0f}s)")
    model.eval()
    return TrainStats(steps, tokens_seen, running, time.perf_counter() - start)


@torch.no_grad()
def completion_statistics(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Teacher-forced statistics of each response (+ EOS) given its prompt.

    Returns (N,) tensors: ``mean_entropy`` (nats per completion token: the mean over the
    completion positions of the entropy of the next-token distribution, as the dispersion
    estimator defines it), ``logprob`` (sum of completion token log-probs) and
    ``n_tokens`` (completion tokens, EOS included).
    """
    model.eval()
    out = {"mean_entropy": [], "logprob": [], "n_tokens": []}
    for lo in range(0, len(prompts), batch_size):
        chunk = zip(prompts[lo : lo + batch_size], responses[lo : lo + batch_size])
        encoded = [encode_document(tokenizer, p, r) for p, r in chunk]
        ids, mask = _pad_right([e[0] for e in encoded], tokenizer.pad_token_id)
        completion = torch.zeros_like(mask)
        for i, (seq, n_prompt) in enumerate(encoded):
            completion[i, n_prompt : len(seq)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)  # (B, T-1): entropy of the distribution predicting token t+1
        token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        predicts_completion = completion[:, 1:].float()
        n = predicts_completion.sum(-1)
        out["mean_entropy"].append((entropy * predicts_completion).sum(-1) / n)
        out["logprob"].append((token_logp * predicts_completion).sum(-1))
        out["n_tokens"].append(n.long())
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def document_nll(
    model: torch.nn.Module, documents: list[list[int]], pad_id: int, batch_size: int = 64
) -> tuple[float, int]:
    """(total negative log-likelihood in nats, number of predicted tokens) over whole documents."""
    model.eval()
    total, count = 0.0, 0
    for lo in range(0, len(documents), batch_size):
        ids, mask = _pad_right(documents[lo : lo + batch_size], pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        total += float(F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="sum"))
        count += int((targets != -100).sum())
    return total, count


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    prompts: list[list[int]],
    num_samples: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    seed: int,
    batch_size: int = 32,
) -> list[list[int] | None]:
    """``num_samples`` completions per prompt (prompt-major order) by ancestral sampling at
    temperature 1 (no top-k, no top-p), with ``model.generate``. Each is its token ids up to
    and including the end token, or None when no end token came within ``max_new_tokens``
    (it is not a finished response).

    Token ids, not text, so that a KL estimate scores exactly what was sampled (decoding and
    re-tokenising can change the tokens). Each batch of prompts is seeded with (seed, batch
    index), so results do not depend on what ran before (they do depend on ``batch_size``);
    the caller's random state and the model's train/eval mode are restored afterwards."""
    was_training = model.training
    model.eval()
    results: list[list[int] | None] = []
    try:
        with torch.random.fork_rng(devices=[]):
            for b, lo in enumerate(range(0, len(prompts), batch_size)):
                chunk = prompts[lo : lo + batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                attention = torch.zeros_like(ids)
                for i, p in enumerate(chunk):  # left padding for generation
                    ids[i, width - len(p) :] = torch.tensor(p)
                    attention[i, width - len(p) :] = 1
                torch.manual_seed(seed * 1_000_003 + b)
                generated = model.generate(
                    input_ids=ids,
                    attention_mask=attention,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    num_return_sequences=num_samples,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos_id,
                    pad_token_id=pad_id,
                )
                for row in generated[:, width:].tolist():
                    results.append(row[: row.index(eos_id) + 1] if eos_id in row else None)
    finally:
        model.train(was_training)
    return results


def sample_responses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    num_samples: int,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 32,
) -> list[list[str | None]]:
    """``sample_completions`` for text prompts: ``num_samples`` decoded responses per prompt
    (without the end token), None for an unfinished sample."""
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    eos = tokenizer.eos_token_id
    flat = sample_completions(
        model, prompt_ids, num_samples, max_new_tokens, eos, tokenizer.pad_token_id, seed, batch_size
    )
    texts = [None if ids is None else tokenizer.decode(ids[:-1], skip_special_tokens=False) for ids in flat]
    return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]
