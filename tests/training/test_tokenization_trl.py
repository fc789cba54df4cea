"""Token ids against TRL 1.16: for the same rows and tokenizer, mallowspo's prompt_input_ids /
chosen_input_ids / rejected_input_ids are the prompt_ids / chosen_ids / rejected_ids of
``trl.DPOTrainer``'s processed train_dataset, and the truncated sequences are those of its
collator (``input_ids`` and ``completion_mask``). Where mallowspo differs on purpose (listed in
``mallowspo.training.data.tokenize``), the test shows the ids of both.

Uses the tiny BOS-adding tokenizer of tests/conftest.py and a tiny random Llama; no network.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings

import datasets
import pytest
from tokenizers import processors
from transformers import LlamaForCausalLM
from trl import DPOConfig, DPOTrainer

from mallowspo.testing.tiny import tiny_llama_config
from mallowspo.training.config import MallowsPOConfig
from mallowspo.training.data import DataValidationError, PreferenceDataConfig, prepare_preference_dataset

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # TRL's default

OURS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
TRLS = ("prompt_ids", "chosen_ids", "rejected_ids")

STANDARD = [
    {"prompt": "What color is the sky?", "chosen": " Blue, on a clear day.", "rejected": " Green."},
    {"prompt": "Name a prime number.", "chosen": " Seven.</s>", "rejected": " Nine is a prime number."},
    {"prompt": "How are you today? ", "chosen": "I am fine.", "rejected": "I am not sure."},  # " " + "I" = "ĠI"
]
CONVERSATIONAL = [
    {
        "prompt": [{"role": "user", "content": "What color is the sky?"}],
        "chosen": [{"role": "assistant", "content": "Blue, on a clear day."}],
        "rejected": [{"role": "assistant", "content": "Green."}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Where is the sun?"},
            {"role": "assistant", "content": "In the sky."},
            {"role": "user", "content": "Are you sure?"},
        ],
        "chosen": [{"role": "assistant", "content": "Yes, I am sure."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    },
]
IMPLICIT = [
    {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]} for row in CONVERSATIONAL
]
STANDARD_IMPLICIT = [
    {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]} for row in STANDARD
]

# A template that renders the tool schemas, the tool calls and an extra variable (`greeting`).
TOOLS_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>{{ tools | tojson }}<|end|>{% endif %}"
    "{% if greeting is defined %}<|system|>{{ greeting }}<|end|>{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message.content %}{{ message.content }}{% endif %}"
    "{% if message.tool_calls %}{{ message.tool_calls | tojson }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
IS_PRIME = {
    "type": "function",
    "function": {
        "name": "is_prime",
        "description": "Whether n is prime.",
        "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
    },
}
CALL = {"type": "function", "function": {"name": "is_prime", "arguments": {"n": 7}}}
TOOL_ROWS = [
    {
        "prompt": [{"role": "user", "content": "Is seven a prime number?"}],
        "chosen": [{"role": "assistant", "content": "", "tool_calls": [CALL]}],
        "rejected": [{"role": "assistant", "content": "No.", "tool_calls": []}],
        "tools": json.dumps([IS_PRIME]),
        "chat_template_kwargs": {"greeting": "Hello there."},
    },
    {
        "prompt": [
            {"role": "user", "content": "Is seven a prime number?", "tool_calls": []},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "content": "true", "tool_calls": []},
        ],
        "chosen": [{"role": "assistant", "content": "Yes, seven is a prime number.", "tool_calls": []}],
        "rejected": [{"role": "assistant", "content": "No.", "tool_calls": []}],
        "tools": json.dumps([IS_PRIME]),
        "chat_template_kwargs": {"greeting": "Hi."},
    },
]


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    datasets.disable_progress_bars()


@pytest.fixture
def tokenizer(tiny_tokenizer):
    return copy.deepcopy(tiny_tokenizer)  # TRL may set attributes on it


def trl_trainer(rows: list[dict], tokenizer, tmp_path, **args) -> DPOTrainer:
    """trl.DPOTrainer on a tiny random Llama; its train_dataset holds TRL's token ids."""
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id))
    config = DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, **args)
    return DPOTrainer(
        model,
        ref_model=LlamaForCausalLM(model.config),
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )


def trl_ids(trainer: DPOTrainer) -> list[tuple[list[int], ...]]:
    return [tuple(row[c] for c in TRLS) for row in trainer.train_dataset]


def our_ids(rows: list[dict], tokenizer, **config) -> list[tuple[list[int], ...]]:
    out, _ = prepare_preference_dataset(datasets.Dataset.from_list(rows), tokenizer, PreferenceDataConfig(**config))
    return [tuple(row[c] for c in OURS) for row in out]


def trl_sequences(trainer: DPOTrainer) -> list[tuple[list[int], list[int]]]:
    """(ids, completion mask) of each sequence of TRL's collated batch: the chosen ones, then the rejected."""
    batch = trainer.data_collator(list(trainer.train_dataset))
    out = []
    for ids, attention, mask in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
        n = int(attention.sum())
        out.append((ids[:n].tolist(), mask[:n].tolist()))
    return out


def our_sequences(rows: list[dict], tokenizer, **config) -> list[tuple[list[int], list[int]]]:
    """The same, from mallowspo's columns (as its collator concatenates them)."""
    ids = our_ids(rows, tokenizer, **config)
    return [(p + c, [0] * len(p) + [1] * len(c)) for side in (1, 2) for p, c in ((r[0], r[side]) for r in ids)]


# ----------------------------------------------------------------------------------------
# Untruncated ids: the same as TRL's
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows",
    [STANDARD, STANDARD_IMPLICIT, CONVERSATIONAL, IMPLICIT],
    ids=["standard", "standard_implicit", "conversational", "conversational_implicit"],
)
def test_ids_equal_trl_dpo_trainer(rows, tokenizer, tmp_path):
    theirs = trl_ids(trl_trainer(rows, tokenizer, tmp_path, max_length=None))
    ours = our_ids(rows, tokenizer, max_length=None)
    assert ours == theirs


def test_bos_is_added_once_and_eos_ends_standard_completions_as_in_trl(tokenizer, tmp_path):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for prompt, chosen, rejected in our_ids(STANDARD, tokenizer, max_length=None):
        assert prompt[0] == bos and prompt.count(bos) == 1
        assert chosen[-1] == rejected[-1] == eos and chosen.count(eos) == 1  # " Seven.</s>" keeps its one EOS
    for prompt, chosen, _ in our_ids(CONVERSATIONAL, tokenizer, max_length=None):  # the template writes both
        assert prompt[0] == bos and prompt.count(bos) == 1 and chosen[-1] == eos


def test_prompt_and_completion_are_tokenized_together_as_in_trl(tokenizer, tmp_path, caplog):
    """'... in the s' + 'ky.': tokenized apart the prompt ends with 'Ġs'; tokenized together, 'Ġsky' is
    one token, so (as in TRL) the completion starts with it and the prompt loses its 'Ġs'."""
    rows = [{"prompt": "Where is the sun? The sun is in the s", "chosen": "ky.", "rejected": "ea."}]
    alone = tokenizer(rows[0]["prompt"])["input_ids"]
    theirs = trl_ids(trl_trainer(rows, tokenizer, tmp_path, max_length=None))
    with caplog.at_level(logging.WARNING):
        out, report = prepare_preference_dataset(
            datasets.Dataset.from_list(rows), tokenizer, PreferenceDataConfig(max_length=None)
        )
    ours = [tuple(row[c] for c in OURS) for row in out]
    assert ours == theirs
    assert ours[0][0] == alone[:-1] and tokenizer.convert_ids_to_tokens(ours[0][1])[0] == "Ġsky"
    assert report.notes == {"prompt_boundary_moved": [0]}
    assert "prompt_boundary_moved" in caplog.text  # logged as a warning, as TRL warns
    assert (
        "row 0: the prompt's last 1 token(s), ' s', start the completions" in report.examples["prompt_boundary_moved"]
    )


# ----------------------------------------------------------------------------------------
# Deliberate differences, with the ids of both
# ----------------------------------------------------------------------------------------


def test_a_prompt_that_starts_with_bos_text_gets_no_second_bos(tokenizer, tmp_path):
    """TRL's tokenizer(text) adds BOS before a text that already starts with it: [BOS, BOS, ...]."""
    rows = [{"prompt": "<s>Name a prime number.", "chosen": " Seven.", "rejected": " Nine."}]
    bos = tokenizer.bos_token_id
    ((their_prompt, their_chosen, their_rejected),) = trl_ids(trl_trainer(rows, tokenizer, tmp_path, max_length=None))
    ((our_prompt, our_chosen, our_rejected),) = our_ids(rows, tokenizer, max_length=None)
    assert their_prompt[:2] == [bos, bos]
    assert our_prompt == their_prompt[1:] and our_prompt.count(bos) == 1
    assert (our_chosen, our_rejected) == (their_chosen, their_rejected)


def test_a_tokenizer_that_appends_eos_gives_one_eos_not_two(tokenizer, tmp_path):
    """A tokenizer that appends EOS to every text: TRL ends each completion with the EOS it appends
    and the tokenizer's, [..., EOS, EOS]; mallowspo with one."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A $B:1 </s>:1", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    assert tokenizer("Hi")["input_ids"][-1] == eos
    theirs = trl_ids(trl_trainer(STANDARD[:1], tokenizer, tmp_path, max_length=None))
    ours = our_ids(STANDARD[:1], tokenizer, max_length=None)
    (their_prompt, their_chosen, _), (our_prompt, our_chosen, _) = theirs[0], ours[0]
    assert their_chosen[-2:] == [eos, eos]
    assert our_prompt == their_prompt and our_chosen == their_chosen[:-1]


# ----------------------------------------------------------------------------------------
# Truncation
# ----------------------------------------------------------------------------------------


def test_keep_start_sequences_equal_trl_collator(tokenizer, tmp_path):
    """keep_start (both defaults): every sequence keeps its first max_length tokens; the prompt
    that fills max_length is dropped by TRL without a word, and is a counted problem here."""
    rows = [*STANDARD, {"prompt": "Write a short poem about the sea and the waves and the wind.", "chosen": " Waves.",
                        "rejected": " Wind."}]  # fmt: skip
    max_length = 20
    trainer = trl_trainer(rows, tokenizer, tmp_path, max_length=max_length)
    assert len(trainer.train_dataset) == 3  # the poem row is gone, silently
    with pytest.raises(
        DataValidationError, match=r"prompt_too_long \(1 row; e\.g\. row 3: .*no room for a completion"
    ):
        our_sequences(rows, tokenizer, max_length=max_length)
    assert our_sequences(rows, tokenizer, max_length=max_length, strict=False) == trl_sequences(trainer)


def test_keep_end_cuts_one_shared_prompt_where_trl_cuts_each_sequence(tokenizer, tmp_path):
    """keep_end: the longer completion's sequence is TRL's (its last max_length tokens); the other
    completion follows the same cut prompt, a suffix of TRL's sequence, which keeps more prompt."""
    rows = [{"prompt": "What color is the sky? The sky is blue on a clear day.", "chosen": " Blue, on a clear day.",
             "rejected": " Green."}]  # fmt: skip
    max_length = 24
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TRL 1.16 deprecates keep_end
        trainer = trl_trainer(rows, tokenizer, tmp_path, max_length=max_length, truncation_mode="keep_end")
    (their_chosen, their_chosen_mask), (their_rejected, their_rejected_mask) = trl_sequences(trainer)
    (our_chosen, our_chosen_mask), (our_rejected, our_rejected_mask) = our_sequences(
        rows, tokenizer, max_length=max_length, truncation_mode="keep_end"
    )
    assert (our_chosen, our_chosen_mask) == (their_chosen, their_chosen_mask) and len(our_chosen) == max_length
    assert our_rejected == their_rejected[-len(our_rejected) :] and len(our_rejected) < len(their_rejected)
    assert our_rejected_mask == their_rejected_mask[-len(our_rejected) :]
    ours = our_ids(rows, tokenizer, max_length=max_length, truncation_mode="keep_end")[0]
    assert our_chosen[: len(ours[0])] == our_rejected[: len(ours[0])]  # one prompt for both


def test_truncated_rows_are_counted_in_the_report(tokenizer):
    dataset = datasets.Dataset.from_list(STANDARD[:2])
    _, report = prepare_preference_dataset(
        dataset, tokenizer, PreferenceDataConfig(max_length=16, max_completion_length=5)
    )
    assert report.problems == {} and report.notes == {"truncated": [0, 1]}
    assert "2 rows, 2 kept (2 truncated), no problems found." in report.summary().splitlines()[0]
    assert report.to_dict()["notes"] == {"truncated": [0, 1]}
    assert "truncation_mode='keep_start'" in report.examples["truncated"]
    _, untouched = prepare_preference_dataset(dataset, tokenizer, PreferenceDataConfig(max_length=None))
    assert untouched.notes == {}


def test_max_length_alone_is_enough():
    """max_length: 128 alone is valid: the prompt has no budget of its own unless one is set."""
    args = MallowsPOConfig(output_dir="unused", report_to="none", max_length=128)
    data = args.to_data_config()
    assert (data.max_length, data.max_prompt_length, data.truncation_mode) == (128, None, "keep_start")
    defaults = PreferenceDataConfig()
    plain = MallowsPOConfig(output_dir="unused", report_to="none").to_data_config()
    assert (
        (plain.max_length, plain.max_prompt_length, plain.max_completion_length, plain.truncation_mode)
        == (
            defaults.max_length,
            defaults.max_prompt_length,
            defaults.max_completion_length,
            defaults.truncation_mode,
        )
        == (1024, None, None, "keep_start")
    )  # TRL's max_length and truncation_mode defaults
    with pytest.raises(ValueError, match=r"max_length \(128\) must exceed max_prompt_length \(512\)"):
        MallowsPOConfig(output_dir="unused", report_to="none", max_length=128, max_prompt_length=512)


# ----------------------------------------------------------------------------------------
# tools and chat_template_kwargs
# ----------------------------------------------------------------------------------------


@pytest.fixture
def tools_tokenizer(tokenizer):
    tokenizer.chat_template = TOOLS_TEMPLATE
    return tokenizer


def test_tools_and_chat_template_kwargs_reach_the_template_as_in_trl(tools_tokenizer, tmp_path):
    theirs = trl_ids(trl_trainer(TOOL_ROWS, tools_tokenizer, tmp_path, max_length=None))
    ours = our_ids(TOOL_ROWS, tools_tokenizer, max_length=None)
    assert ours == theirs
    schema = tools_tokenizer.apply_chat_template([IS_PRIME], tokenize=False, chat_template="{{ messages | tojson }}")
    schema_ids = tools_tokenizer(schema, add_special_tokens=False)["input_ids"]
    for (prompt, _, _), greeting in zip(ours, ("Hello there.", "Hi.")):
        text = tools_tokenizer.decode(prompt)
        assert schema in text and "Whether n is prime." in text and greeting in text
        assert any(prompt[i : i + len(schema_ids)] == schema_ids for i in range(len(prompt)))  # the schema's ids
    assert '"is_prime"' in tools_tokenizer.decode(ours[0][1])  # the chosen tool call is the completion


def test_tool_calls_without_tools_are_refused_naming_the_row(tools_tokenizer):
    rows = [{k: v for k, v in row.items() if k != "tools"} for row in TOOL_ROWS]
    for strict in (True, False):
        with pytest.raises(DataValidationError) as caught:
            prepare_preference_dataset(
                datasets.Dataset.from_list(rows), tools_tokenizer, PreferenceDataConfig(strict=strict)
            )
        message = str(caught.value)
        assert "missing_tools (2 rows; e.g. row 0: message 0 of 'chosen' calls a tool" in message
        assert "no 'tools' column" in message and "cannot be skipped" in message and "\n" not in message
    rows[1]["tools"], rows[0]["tools"] = json.dumps([IS_PRIME]), None
    with pytest.raises(DataValidationError, match="row 0: .*has no value in its 'tools' column"):
        prepare_preference_dataset(datasets.Dataset.from_list(rows), tools_tokenizer, PreferenceDataConfig())


def test_completions_that_differ_only_in_tool_calls_are_a_preference(tools_tokenizer):
    other = {"type": "function", "function": {"name": "is_prime", "arguments": {"n": 9}}}
    row = dict(TOOL_ROWS[0], rejected=[{"role": "assistant", "content": None, "tool_calls": [other]}])
    row["chosen"] = [{"role": "assistant", "content": None, "tool_calls": [CALL]}]
    out, report = prepare_preference_dataset(
        datasets.Dataset.from_list([row]), tools_tokenizer, PreferenceDataConfig()
    )
    assert report.problems == {} and out[0]["chosen_input_ids"] != out[0]["rejected_input_ids"]


def test_template_columns_of_standard_rows_are_ignored_with_a_warning(tokenizer, caplog):
    rows = [dict(row, tools=json.dumps([IS_PRIME])) for row in STANDARD]
    with caplog.at_level(logging.WARNING):
        with_tools = our_ids(rows, tokenizer)
    assert with_tools == our_ids(STANDARD, tokenizer)
    assert "the 'tools' column of preference data 'train' is ignored: the rows are standard" in caplog.text
