"""Templates and tokens (pass 3 of ``prepare_preference_dataset``), as TRL 1.16's DPOTrainer
makes them: render a checked pair as three texts (the prompt, prompt + chosen, prompt +
rejected), tokenize each, split prompt from completions where their tokens diverge, then
apply the token budgets and ``truncation_mode``.

Where mallowspo differs from TRL, and why (see tests/training/test_tokenization_trl.py):

- a standard prompt whose text already starts with the BOS token gets no second BOS (TRL's
  ``tokenizer(text)`` writes ``[BOS, BOS, ...]``, a sequence the model never saw);
- special tokens that a tokenizer appends to every text (an EOS, for a few tokenizers) are
  not appended: the completion already ends with the EOS that ``add_eos`` adds, and TRL
  would end it with two;
- ``keep_end`` cuts the shared prompt once, for the longer completion, so that chosen and
  rejected are scored after the same prompt (TRL cuts each sequence by itself, so the two
  completions of a pair can follow different prompts);
- a prompt that leaves no room for a completion is a counted problem (TRL drops it silently).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mallowspo.training.data.validate import CheckedPair, RowProblem, short_error

if TYPE_CHECKING:
    from mallowspo.training.data.prepare import PreferenceDataConfig


def render_pair(pair: CheckedPair, tokenizer, eos_token: str | None) -> tuple[str, str, str]:
    """The prompt, prompt + chosen and prompt + rejected texts.

    Conversations go through the tokenizer's chat template with the row's tools and extra
    template variables: the prompt with the generation prompt, each full conversation
    without. Standard completions end with ``eos_token`` unless their text already does
    (None: no EOS), as TRL appends it.
    """
    if not pair.conversational:
        chosen, rejected = (_with_eos(text, eos_token) for text in (pair.chosen, pair.rejected))
        return pair.prompt, pair.prompt + chosen, pair.prompt + rejected
    kwargs = {"tools": pair.tools, **pair.template_kwargs}
    try:
        prompt = tokenizer.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True, **kwargs)
        chosen, rejected = (
            tokenizer.apply_chat_template(pair.prompt + completion, tokenize=False, **kwargs)
            for completion in (pair.chosen, pair.rejected)
        )
    except Exception as error:  # noqa: BLE001 - a template may raise anything (jinja2 errors)
        raise RowProblem("bad_messages", f"the chat template failed on it: {short_error(error)}") from None
    return prompt, chosen, rejected


def _with_eos(text: str, eos_token: str | None) -> str:
    return text if eos_token is None or text.endswith(eos_token) else text + eos_token


def leading_special_ids(tokenizer) -> list[int]:
    """Tokens `tokenizer(text)` puts before every text (e.g. [BOS]); [] if none."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def with_leading(ids: list[int], leading: list[int]) -> list[int]:
    """``leading`` + ``ids``, unless ``ids`` already start with ``leading`` (no double BOS)."""
    return ids if ids[: len(leading)] == leading else leading + ids


def split_at_prompt(
    prompt: list[int], chosen: list[int], rejected: list[int]
) -> tuple[list[int], list[int], list[int], bool]:
    """Prompt, chosen and rejected ids from the ids of the prompt and of the two full texts.

    The completions start where the prompt's ids and each full text's ids first differ (the
    shorter of the two common prefixes), as in TRL: usually after the whole prompt, but
    earlier when tokens merge across the boundary or the template renders the prompt alone
    differently. The flag says whether the prompt lost tokens so. Raises RowProblem when no
    prompt token is left.
    """
    length = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    if length == 0:
        raise RowProblem(
            "bad_messages",
            "the prompt alone and the full conversation have no leading token in common, so no prompt is left "
            "(the chat template renders the prompt differently on its own)",
        )
    return prompt[:length], chosen[length:], rejected[length:], length < len(prompt)


def _common_prefix(ids: list[int], other: list[int]) -> int:
    length = 0
    for token, other_token in zip(ids, other):
        if token != other_token:
            break
        length += 1
    return length


# A text longer than max(LONG_TEXT_MIN_CHARS, LONG_TEXT_CHARS_PER_TOKEN * limit) characters,
# where `limit` is the most tokens of it that can matter, is tokenized by prefixes only: the
# tokens past the budget would be dropped anyway, and a multi-megabyte completion would
# otherwise cost seconds and gigabytes to tokenize.
LONG_TEXT_MIN_CHARS = 1 << 16
LONG_TEXT_CHARS_PER_TOKEN = 64
PREFIX_MARGIN_TOKENS = 8  # tokens next to a cut may change with it: agree on this many more


def token_limits(config: PreferenceDataConfig) -> tuple[int | None, int | None]:
    """How many leading tokens of a prompt and of a completion can matter (None: all of them).

    One token over the prompt's budget is enough to know it is too long (keep_start: its
    budget is max_prompt_length and what max_length leaves; keep_end cuts the prompt's start,
    so only max_prompt_length bounds it). A completion keeps at most
    min(max_completion_length, max_length) tokens (keep_end: one that fills max_length is a
    problem, whatever its length).
    """
    prompt = [config.max_prompt_length]
    if config.truncation_mode == "keep_start":
        prompt.append(config.max_length)
    prompt = [b for b in prompt if b is not None]
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
    tokenizer, texts: list[str], limits: list[int | None], batch_size: int = 512
) -> tuple[list[list[int]], set[int]]:
    """Token ids of each text (no special tokens added), and the positions of the texts that
    were only tokenized as far as their limit of tokens can matter (see LONG_TEXT_MIN_CHARS).

    limits: per text, how many of its leading tokens can matter (None: all).
    """
    ids: list[list[int]] = []
    clipped: set[int] = set()
    for start in range(0, len(texts), batch_size):
        chunk, chunk_limits = texts[start : start + batch_size], limits[start : start + batch_size]
        long = [limit is not None and len(text) > _long_text_chars(limit) for text, limit in zip(chunk, chunk_limits)]
        encoded = tokenizer([("" if is_long else t) for t, is_long in zip(chunk, long)], add_special_tokens=False)
        for offset, (text, limit, row, is_long) in enumerate(zip(chunk, chunk_limits, encoded["input_ids"], long)):
            if is_long:
                leading_ids, complete = _leading_token_ids(tokenizer, text, limit)
                ids.append(leading_ids)
                if not complete:
                    clipped.add(start + offset)
            else:
                ids.append(list(row))
    return ids, clipped


def _long_text_chars(limit: int) -> int:
    return max(LONG_TEXT_MIN_CHARS, LONG_TEXT_CHARS_PER_TOKEN * limit)


def truncate_and_check(
    prompt_ids: list[int], completions: dict[str, list[int]], config: PreferenceDataConfig, special_ids: set[int]
) -> tuple[list[int], dict[str, list[int]], bool]:
    """The prompt and completions within the budgets, and whether anything was cut.

    Raises RowProblem: prompt_too_long, completion_too_long (keep_end),
    completion_empty_after_truncation, chosen_equals_rejected (after truncation).
    """
    _check_prompt_budget(len(prompt_ids), config)
    if config.truncation_mode == "keep_start":
        prompt, kept = prompt_ids, _keep_start(prompt_ids, completions, config)
    else:
        prompt, kept = _keep_end(prompt_ids, completions, config)
    _check_completions(completions, kept, special_ids)
    cut = len(prompt) < len(prompt_ids) or any(len(kept[n]) < len(ids) for n, ids in completions.items())
    return prompt, kept, cut


def _check_prompt_budget(n_prompt: int, config: PreferenceDataConfig) -> None:
    if config.max_prompt_length is not None and n_prompt > config.max_prompt_length:
        raise RowProblem(
            "prompt_too_long", f"the prompt has {n_prompt} tokens > max_prompt_length={config.max_prompt_length}"
        )
    if config.truncation_mode == "keep_start" and config.max_length is not None and n_prompt >= config.max_length:
        raise RowProblem(
            "prompt_too_long",
            f"the prompt has {n_prompt} tokens, leaving no room for a completion within max_length={config.max_length}",
        )


def _keep_start(
    prompt_ids: list[int], completions: dict[str, list[int]], config: PreferenceDataConfig
) -> dict[str, list[int]]:
    """TRL's keep_start: each sequence keeps its first max_length tokens, so (the prompt fitting)
    each completion keeps its first max_length - len(prompt) tokens, and at most
    max_completion_length."""
    budgets = [config.max_completion_length]
    if config.max_length is not None:
        budgets.append(config.max_length - len(prompt_ids))
    budget = min((b for b in budgets if b is not None), default=None)
    return {name: ids[:budget] for name, ids in completions.items()}


def _keep_end(
    prompt_ids: list[int], completions: dict[str, list[int]], config: PreferenceDataConfig
) -> tuple[list[int], dict[str, list[int]]]:
    """keep_end: the sequences keep their last max_length tokens, with one prompt for both
    completions. Completions keep their first max_completion_length tokens; the prompt loses
    its first tokens, as many as the longer completion needs. A completion that alone fills
    max_length would leave no prompt: completion_too_long."""
    kept = {name: ids[: config.max_completion_length] for name, ids in completions.items()}
    if config.max_length is None:
        return prompt_ids, kept
    name, longest = max(kept.items(), key=lambda item: len(item[1]))
    room = config.max_length - len(longest)
    if room < 1:
        raise RowProblem(
            "completion_too_long",
            f"'{name}' has {len(longest)} tokens, leaving no room for a prompt token within "
            f"max_length={config.max_length}",
        )
    return prompt_ids[-room:] if len(prompt_ids) > room else prompt_ids, kept


def _check_completions(completions: dict[str, list[int]], kept: dict[str, list[int]], special_ids: set[int]) -> None:
    for name, ids in completions.items():
        if special_ids.issuperset(kept[name]):
            if len(kept[name]) == len(ids):
                detail = f"'{name}' has no content token after tokenization (token ids {ids})"
            else:
                detail = (
                    f"'{name}' keeps only special tokens after truncation to {len(kept[name])} of {len(ids)} tokens"
                )
            raise RowProblem("completion_empty_after_truncation", detail)
    if kept["chosen"] == kept["rejected"]:
        raise RowProblem(
            "chosen_equals_rejected",
            f"'chosen' and 'rejected' have the same {len(kept['chosen'])} tokens after truncation",
        )
