"""Reliability, caches: the reference-pass cache is reused only for exactly the same inputs.

Every input of the cache key, changed alone, recomputes; nothing changed reuses; the log
says which happened. A damaged entry is recomputed and replaced, a cache that cannot be
written only warns, and a pass that gives NaN is an error that caches nothing.
(tests/test_reference.py checks reuse and a first set of invalidations.)
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mallowspo.training.data import PreferenceDataConfig, load_preference_dataset
from mallowspo.training.reference_cache import token_fingerprint

torch.set_num_threads(1)

BASE = PreferenceDataConfig(max_length=200, max_prompt_length=100)


@pytest.fixture(scope="module")
def inputs(tiny_lm_dir, tiny_prefs_path):
    raw = load_preference_dataset(str(tiny_prefs_path)).select(range(16))
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    return raw, tokenizer, model


@pytest.fixture
def run_pass(reference_pass):
    """run_pass(raw, tokenizer, model, config=BASE): the shared reference pass."""
    return lambda raw, tokenizer, model, config=BASE: reference_pass(raw, tokenizer, model, config)


def change(what, raw, tokenizer, model):
    """The inputs with one of them changed; the others are the same objects."""
    config = BASE
    if what == "data content":  # one character of one completion, same number of rows
        raw = raw.map(lambda row, i: {"chosen": row["chosen"] + "!"} if i == 5 else {}, with_indices=True)
    elif what == "reference weights":
        model = copy.deepcopy(model)
        with torch.no_grad():
            model.model.norm.weight[0] += 1e-3
    elif what == "tokenizer":  # a token added that the data never uses: the data's tokens stay the same
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    elif what == "chat template":  # standard data: the tokens stay the same
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = tokenizer.chat_template.replace("<|end|>", "\n<|end|>")
    elif what == "max length":  # no row is cut at either length: the tokens stay the same
        config = PreferenceDataConfig(max_length=256, max_prompt_length=100)
    elif what == "truncation":
        config = PreferenceDataConfig(max_length=200, max_prompt_length=100, max_completion_length=4)
    return raw, tokenizer, model, config


CHANGES = [None, "data content", "reference weights", "tokenizer", "chat template", "max length", "truncation"]
SAME_TOKENS = {"tokenizer", "chat template", "max length", "reference weights"}


@pytest.mark.parametrize("what", CHANGES, ids=[c or "nothing" for c in CHANGES])
def test_each_cache_key_input_changed_alone_recomputes(what, inputs, mallowspo_cache, caplog, run_pass):
    raw, tokenizer, model = inputs
    first, dataset = run_pass(raw, tokenizer, model)
    assert not first.reused
    raw2, tokenizer2, model2, config2 = change(what, raw, tokenizer, model)
    with caplog.at_level(logging.INFO, logger="mallowspo.training.reference"):
        second, dataset2 = run_pass(raw2, tokenizer2, model2, config2)
    if what is None:
        assert second.reused and second.cache_dir == first.cache_dir
        assert f"reused the cache at {first.cache_dir}" in caplog.text
        return
    assert not second.reused and second.cache_dir != first.cache_dir
    assert "computing for 16 rows (no cache entry for key" in caplog.text
    if what in SAME_TOKENS:  # the key holds more than the tokens
        assert token_fingerprint(dataset2) == token_fingerprint(dataset)
    third, _ = run_pass(raw2, tokenizer2, model2, config2)
    assert third.reused and third.cache_dir == second.cache_dir


def test_damaged_entry_is_recomputed_and_replaced(inputs, mallowspo_cache, caplog, run_pass):
    raw, tokenizer, model = inputs
    first, _ = run_pass(raw, tokenizer, model)
    (first.cache_dir / "columns.npz").write_bytes(b"PK\x03\x04 cut short")  # a damaged file
    with caplog.at_level(logging.WARNING, logger="mallowspo.training.reference"):
        second, _ = run_pass(raw, tokenizer, model)
    assert not second.reused and "is unreadable" in caplog.text and "recomputing it" in caplog.text
    third, _ = run_pass(raw, tokenizer, model)
    assert third.reused
    for name, values in first.columns.items():
        np.testing.assert_array_equal(third.columns[name], values)


def test_unwritable_cache_only_warns(inputs, tmp_path, monkeypatch, caplog, run_pass):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("MALLOWSPO_CACHE", str(blocker / "cache"))  # cannot be created
    raw, tokenizer, model = inputs
    with caplog.at_level(logging.WARNING, logger="mallowspo.training.reference"):
        result, dataset = run_pass(raw, tokenizer, model)
    assert not result.reused and len(result.columns["hbar"]) == len(dataset)
    assert "could not cache the results" in caplog.text and "continuing without the cache" in caplog.text


def test_nan_reference_pass_is_an_error_and_caches_nothing(inputs, mallowspo_cache, run_pass):
    raw, tokenizer, model = inputs
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"gave NaN or inf .* for 16 of 16 pairs \(data rows 0, 1, 2, 3, 4"):
        run_pass(raw, tokenizer, broken)
    assert not list(mallowspo_cache.glob("reference/*/meta.json"))


def test_data_file_changed_in_place_is_read_again(tmp_path, isolated_hf_datasets_cache):
    """`datasets` caches a parsed file under its path, size and mtime: a file rewritten with
    both kept (cp -p, rsync -t, two edits within the mtime resolution) must not load stale rows."""
    import json
    import os

    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "What color is the sky?", "chosen": " Blue.", "rejected": " Red."}) + "\n")
    assert load_preference_dataset(path)["chosen"][:] == [" Blue."]
    stat = path.stat()
    path.write_text(json.dumps({"prompt": "What color is the sky?", "chosen": " Grey.", "rejected": " Red."}) + "\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert load_preference_dataset(path)["chosen"][:] == [" Grey."]
