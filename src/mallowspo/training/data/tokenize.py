"""Templates and tokens: render a checked pair (chat template for conversations), tokenize
prompt and completions separately, and apply the token budgets (pass 3 of
``prepare_preference_dataset``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from trl.data_utils import apply_chat_template

from mallowspo.training.data.validate import CheckedPair, RowProblem, short_error

if TYPE_CHECKING:
    from mallowspo.training.data.prepare import PreferenceDataConfig


def render_pair(pair: CheckedPair, tokenizer) -> tuple[str, str, str]:
    """Prompt and completion texts; conversations go through TRL's apply_chat_template."""
    if not pair.conversational:
        return pair.prompt, pair.chosen, pair.rejected
    try:
        out = apply_chat_template({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}, tokenizer)
    except Exception as error:  # noqa: BLE001 - a template may raise anything (jinja2 errors)
        raise RowProblem("bad_messages", f"the chat template failed on it: {short_error(error)}") from None
    return out["prompt"], out["chosen"], out["rejected"]


def leading_special_ids(tokenizer) -> list[int]:
    """Tokens `tokenizer(text)` puts before every text (e.g. [BOS]); [] if none."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


# A text longer than max(LONG_TEXT_MIN_CHARS, LONG_TEXT_CHARS_PER_TOKEN * limit) characters,
# where `limit` is the most tokens of it that can matter, is tokenized by prefixes only: the
# tokens past the budget would be dropped anyway, and a multi-megabyte completion would
# otherwise cost seconds and gigabytes to tokenize.
LONG_TEXT_MIN_CHARS = 1 << 16
LONG_TEXT_CHARS_PER_TOKEN = 64
PREFIX_MARGIN_TOKENS = 8  # tokens next to a cut may change with it: agree on this many more


def token_limits(config: PreferenceDataConfig) -> tuple[int | None, int | None]:
    """How many leading tokens of a prompt and of a completion can matter (None: all of them).

    A prompt is never truncated, but one token over its budget is enough to know it is too
    long; a completion keeps at most min(max_completion_length, max_length) tokens.
    """
    prompt = [b for b in (config.max_prompt_length, config.max_length) if b is not None]
    completion = [b for b in (config.max_completion_length, config.max_length) if b is not None]
    return (min(prompt) + 1 if prompt else None), (min(completion) if completion else None)


def _leading_token_ids(tokenizer, text: str, count: int) -> tuple[list[int], bool]:
    """The first count + PREFIX_MARGIN_TOKENS token ids of `text`, from prefixes of it, and
    False; or all its ids and True when the whole text had to be read.

    The ids of a prefix are accepted once they agree with those of a prefix twice as long
    (cutting a text changes only the tokens next to the cut).
    """
    need = count + PREFIX_MARGIN_TOKENS
    size = max(1024, 16 * need)  # characters; doubled until the leading ids are stable
    ids = tokenizer(text[:size], add_special_tokens=False)["input_ids"]
    while size < len(text):
        size *= 2
        longer = tokenizer(text[:size], add_special_tokens=False)["input_ids"]
        if len(ids) >= need and ids[:need] == longer[:need]:
            return list(longer[:need]), False
        ids = longer
    return list(ids), True


def tokenize_texts(
    tokenizer, texts: list[str], limit: int | None = None, batch_size: int = 512
) -> tuple[list[list[int]], set[int]]:
    """Token ids of each text (no special tokens added), and the positions of the texts that
    were only tokenized as far as `limit` tokens can matter (see LONG_TEXT_MIN_CHARS)."""
    threshold = None if limit is None else max(LONG_TEXT_MIN_CHARS, LONG_TEXT_CHARS_PER_TOKEN * limit)
    ids: list[list[int]] = []
    clipped: set[int] = set()
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        long = [threshold is not None and len(text) > threshold for text in chunk]
        encoded = tokenizer([("" if is_long else t) for t, is_long in zip(chunk, long)], add_special_tokens=False)
        for offset, (text, row, is_long) in enumerate(zip(chunk, encoded["input_ids"], long)):
            if is_long:
                leading_ids, complete = _leading_token_ids(tokenizer, text, limit)
                ids.append(leading_ids)
                if not complete:
                    clipped.add(start + offset)
            else:
                ids.append(list(row))
    return ids, clipped


def truncate_and_check(
    prompt_ids: list[int], completions: dict[str, list[int]], config: PreferenceDataConfig, special_ids: set[int]
) -> dict[str, list[int]]:
    n_prompt = len(prompt_ids)
    if config.max_prompt_length is not None and n_prompt > config.max_prompt_length:
        raise RowProblem(
            "prompt_too_long", f"the prompt has {n_prompt} tokens > max_prompt_length={config.max_prompt_length}"
        )
    if config.max_length is not None and n_prompt >= config.max_length:
        raise RowProblem(
            "prompt_too_long",
            f"the prompt has {n_prompt} tokens, leaving no room for a completion within max_length={config.max_length}",
        )
    budget = min(
        config.max_completion_length if config.max_completion_length is not None else math.inf,
        config.max_length - n_prompt if config.max_length is not None else math.inf,
    )
    out = {}
    for name, ids in completions.items():
        kept = ids if budget >= len(ids) else ids[: int(budget)]
        if special_ids.issuperset(kept):
            if len(kept) == len(ids):
                detail = f"'{name}' has no content token after tokenization (token ids {ids})"
            else:
                detail = f"'{name}' keeps only special tokens after truncation to {len(kept)} of {len(ids)} tokens"
            raise RowProblem("completion_empty_after_truncation", detail)
        out[name] = kept
    if out["chosen"] == out["rejected"]:
        raise RowProblem(
            "chosen_equals_rejected",
            f"'chosen' and 'rejected' have the same {len(out['chosen'])} tokens after truncation",
        )
    return out
