"""The annotators dispersion source in training: annotation columns carried through validation and
tokenization, the MultiPref and HelpSteer2-Preference layouts (``dispersion_format``) on synthetic
rows of their hub shape, and a tiny training run whose neg_log_phi is checked against the
estimators of ``mallowspo.annotators`` applied by hand, the eval split reusing the train prior."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mallowspo.annotators import fit_vote_prior, neg_log_phi_from_votes
from mallowspo.testing.tiny import tiny_run_settings
from mallowspo.training.config import MallowsPOConfig
from mallowspo.training.config_checks import ignored_settings
from mallowspo.training.data import DataValidationError, PreferenceDataConfig, prepare_preference_dataset
from mallowspo.training.data.annotations import helpsteer2_prompt, map_annotation_format
from mallowspo.training.trainer import MallowsPOTrainer

torch.set_num_threads(1)

PAIRS = [
    ("What color is the sky?", "The sky is blue.", "The sky is green."),
    ("Name a prime number.", "Seven is a prime number.", "Nine is a prime number."),
    ("Where is the sun?", "The sun is in the sky.", "The sun is in the sea."),
    ("How are you today?", "I am fine, thank you.", "I am not sure."),
]


def standard_rows(chosen_votes, rejected_votes, repeat=1) -> datasets.Dataset:
    rows = [
        {"prompt": p, "chosen": c, "rejected": r, "cv": cv, "rv": rv}
        for (p, c, r), cv, rv in zip(PAIRS * repeat, chosen_votes, rejected_votes)
    ]
    return datasets.Dataset.from_list(rows)


# ----------------------------------------------------------------------------- carrying the columns


def test_annotation_columns_are_carried_unchanged_and_required(tiny_tokenizer):
    raw = standard_rows([3, 2, 1, 0], [0, 1, 1, 2]).add_column("votes", [[1, 1], [1, None], [0, 1], [0, 0]])
    config = PreferenceDataConfig(annotation_columns=("cv", "rv", "votes"))
    tokenized, _ = prepare_preference_dataset(raw, tiny_tokenizer, config)
    assert tokenized["cv"] == [3, 2, 1, 0] and tokenized["votes"] == [[1, 1], [1, None], [0, 1], [0, 0]]
    with pytest.raises(DataValidationError, match=r"missing_columns .*no column 'stars'") as error:
        prepare_preference_dataset(raw, tiny_tokenizer, PreferenceDataConfig(annotation_columns=("stars",)))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="annotation column 'prompt' has the name of a column the tokenized data"):
        PreferenceDataConfig(annotation_columns=("prompt",))


def test_the_config_carries_the_columns_of_the_annotators_source_only():
    args = MallowsPOConfig(
        output_dir="out", dispersion_source="annotators", dispersion_strengths_column="individual_preference"
    )
    assert args.to_data_config().annotation_columns == ("individual_preference",)
    entropy = MallowsPOConfig(output_dir="out", dispersion_votes_column="votes", dispersion_consensus="given")
    assert entropy.to_data_config().annotation_columns == ()
    warnings = ignored_settings(entropy)
    assert any(
        w.startswith("dispersion_votes_column='votes' is ignored: it applies to dispersion_source=") for w in warnings
    )
    assert any(w.startswith("dispersion_consensus='given' is ignored") for w in warnings)
    with pytest.raises(ValueError, match="dispersion_source 'annotators' needs the annotations"):
        MallowsPOConfig(output_dir="out", dispersion_source="annotators")


# ----------------------------------------------------------------------------- the hub layouts


def multipref_row(labels_normal, labels_expert, text="What color is the sky?"):
    annotation = lambda label: {"evaluator": "w", "overall_pref": label, "helpful_pref": "Tie", "time_spent": 30}
    return {
        "comparison_id": "c",
        "text": text,
        "completion_a": "The sky is blue.",
        "completion_b": "The sky is green.",
        "source": "s",
        "normal_worker_annotations": [annotation(label) for label in labels_normal],
        "expert_worker_annotations": [annotation(label) for label in labels_expert],
    }


def test_multipref_rows_become_pairs_chosen_by_the_majority_with_votes_for_chosen():
    rows = [
        multipref_row(["A-is-clearly-better", "A-is-slightly-better"], ["B-is-slightly-better", "Tie"]),
        multipref_row(["B-is-clearly-better", "B-is-clearly-better"], ["B-is-slightly-better", "A-is-clearly-better"]),
        multipref_row(["A-is-clearly-better", "B-is-slightly-better"], ["Tie", "Tie"]),  # 1-1: no majority
        multipref_row(["Tie", None], ["A-is-slightly-better", "A-is-clearly-better"]),
    ]
    pairs = map_annotation_format(datasets.Dataset.from_list(rows), "multipref")
    assert len(pairs) == 3
    assert pairs["chosen"][0] == [{"role": "assistant", "content": "The sky is blue."}]
    assert pairs["chosen"][1] == [{"role": "assistant", "content": "The sky is green."}]
    assert pairs["prompt"][0] == [{"role": "user", "content": "What color is the sky?"}]
    assert pairs["annotator_votes"] == [[1, 1, 0, None], [1, 1, 1, 0], [None, None, 1, 1]]
    with pytest.raises(DataValidationError, match=r"row 0 \(multipref layout\): overall_pref: unknown preference"):
        map_annotation_format(datasets.Dataset.from_list([multipref_row(["A-better"], [])]), "multipref")


def helpsteer2_row(strength, annotators, prompt="Define a signal"):
    return {
        "split": "train",
        "prompt": prompt,
        "response_1": "A signal carries information.",
        "response_2": "A signal is a wave.",
        "preference_strength": strength,
        "preference_statement": "@Response 1 is better",
        "three_most_similar_preferences": [
            {"statement": "s", "elaboration": "e", "strength": s} for s in annotators[:3]
        ],
        "all_preferences_unprocessed": [{"strength": s, "justification": "j"} for s in annotators],
    }


def test_helpsteer2_rows_become_pairs_chosen_by_the_overall_strength():
    rows = [
        helpsteer2_row(-2, [-3, -1, 2]),
        helpsteer2_row(1, [1, 0, 2, -100, -1]),  # -100: not rated, no vote; 0: a tie
        helpsteer2_row(0, [1, -1, 0]),  # an overall tie: no chosen response
        helpsteer2_row(2, [-100, 0, 0]),  # no vote for either response
    ]
    pairs = map_annotation_format(datasets.Dataset.from_list(rows), "helpsteer2")
    assert len(pairs) == 2
    assert pairs["chosen"][0][0]["content"] == "A signal carries information."
    assert pairs["chosen"][1][0]["content"] == "A signal is a wave."
    assert pairs["annotator_votes"] == [[1, 1, 0], [1, None, 1, None, 0]]
    with pytest.raises(DataValidationError, match=r"not in the helpsteer2 layout .*no column 'response_1'"):
        map_annotation_format(
            datasets.Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}]), "helpsteer2"
        )


def test_helpsteer2_multi_turn_prompts_become_messages():
    text = "Hi there\n<extra_id_1>Assistant\nHello! How can I help?\n<extra_id_1>User\nDefine a signal"
    assert helpsteer2_prompt(text) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Define a signal"},
    ]


def test_a_format_goes_through_validation_and_tokenization(tiny_tokenizer):
    raw = datasets.Dataset.from_list([helpsteer2_row(-2, [-3, -1, 2]), helpsteer2_row(3, [2, 3, 3])])
    config = PreferenceDataConfig(annotation_format="helpsteer2", annotation_columns=("annotator_votes",))
    tokenized, report = prepare_preference_dataset(raw, tiny_tokenizer, config)
    assert report.kept_rows == 2 and tokenized["annotator_votes"] == [[1, 1, 0], [1, 1, 1]]


# ----------------------------------------------------------------------------- a training run


def make_trainer(tiny_lm_dir, tmp_path, train, eval_dataset=None, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        mallows="theta",
        dispersion_source="annotators",
        dispersion_chosen_votes_column="cv",
        dispersion_rejected_votes_column="rv",
    )
    return MallowsPOTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
        args=MallowsPOConfig(**tiny_run_settings(**{**settings, **overrides})),
        train_dataset=train,
        eval_dataset=eval_dataset,
        processing_class=AutoTokenizer.from_pretrained(tiny_lm_dir),
    )


TRAIN_CHOSEN, TRAIN_REJECTED = [3, 2, 3, 2, 3, 1, 2, 3, 3, 2, 2, 3], [0, 1, 0, 1, 0, 2, 1, 0, 0, 1, 1, 0]
EVAL_CHOSEN, EVAL_REJECTED = [3, 2, 2, 3], [0, 1, 1, 0]


def test_a_training_run_attaches_the_votes_estimate_and_eval_reuses_the_train_prior(
    tiny_lm_dir, tmp_path, mallowspo_cache, caplog
):
    train = standard_rows(TRAIN_CHOSEN, TRAIN_REJECTED, repeat=3)
    evaluation = standard_rows(EVAL_CHOSEN, EVAL_REJECTED)
    trainer = make_trainer(tiny_lm_dir, tmp_path, train, evaluation, dispersion_clamp=[0.05, 1.2])
    assert "dispersion (train): 1 of 12 pairs have more votes for rejected than for chosen" in caplog.text

    agree, total = np.maximum(TRAIN_CHOSEN, TRAIN_REJECTED), np.add(TRAIN_CHOSEN, TRAIN_REJECTED)
    prior = fit_vote_prior(agree, total)  # consensus majority (the default)
    raw = neg_log_phi_from_votes(agree, total, prior=prior)
    phi_star = 1.0 / raw.mean()
    expected = np.clip(phi_star * raw, 0.05, 1.2)
    np.testing.assert_allclose(trainer.train_dataset["neg_log_phi"], expected, rtol=1e-12)
    assert trainer.phi_star == pytest.approx(phi_star) and trainer.dispersion_prior == pytest.approx(prior)
    values = np.asarray(trainer.train_dataset["neg_log_phi"])
    assert values[0] > values[1] and values[0] == values[2]  # unanimous (3 of 3) above split (2 of 3)

    eval_raw = neg_log_phi_from_votes(np.maximum(EVAL_CHOSEN, EVAL_REJECTED), [3] * 4, prior=prior)
    np.testing.assert_allclose(
        trainer.eval_dataset["neg_log_phi"], np.clip(phi_star * eval_raw, 0.05, 1.2), rtol=1e-12
    )

    trainer.train()
    assert trainer.resolved_config()["training"]["dispersion_prior"] == pytest.approx(list(prior))


def test_bad_annotation_columns_stop_the_run_in_one_line(tiny_lm_dir, tmp_path, mallowspo_cache):
    train = standard_rows([3, 2, 1, 0], [0, 1, 1, 2])
    with pytest.raises(DataValidationError, match=r"missing_columns .*no column 'stars'") as error:
        make_trainer(tiny_lm_dir, tmp_path, train, dispersion_chosen_votes_column="stars")
    assert "\n" not in str(error.value)
    bad = standard_rows([3, 2, 1, 0], [0, 1, -1, 2])
    with pytest.raises(ValueError, match=r"^data row 2: dispersion_chosen_votes_column 'cv' and .* -1 is not a count"):
        make_trainer(tiny_lm_dir, tmp_path, bad)
