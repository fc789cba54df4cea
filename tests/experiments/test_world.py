"""The built-in world: determinism, loading, annotators vs the Mallows marginals, and the
entropy gap between prompt families. The full build is @slow; the rest uses a miniature
world built in a temporary directory, and the shipped world when it is present."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from mallowspo.experiments.world import corpus
from mallowspo.experiments.world.annotators import (
    annotate,
    annotate_list,
    annotator_ranks,
    central_order,
    check_annotators,
)
from mallowspo.experiments.world.paths import ASSETS_DIR, WorldPaths
from mallowspo.experiments.world.reward import sentiment_reward, sentiment_rewards
from mallowspo.mallows import pairwise_prob

# ----------------------------------------------------------------------------- corpus and reward


def test_corpus_is_deterministic_under_its_seed():
    prompts = corpus.make_prompts(0)
    assert prompts == corpus.make_prompts(0)
    train = [p for p in prompts if p.split == "train"]
    docs = corpus.make_corpus(train, {"closed": 2, "open": 3}, seed=0)
    assert docs == corpus.make_corpus(train, {"closed": 2, "open": 3}, seed=0)
    assert docs != corpus.make_corpus(train, {"closed": 2, "open": 3}, seed=1)
    assert [p.prompt_id for p in prompts] != [p.prompt_id for p in corpus.make_prompts(1)]


def test_prompts_cover_both_families_and_hold_out_titles():
    prompts = corpus.make_prompts(0)
    assert len(prompts) == len(corpus.TITLE_ADJECTIVES) * len(corpus.TITLE_NOUNS) * len(corpus.TEMPLATES)
    test_titles = {(p.adjective, p.noun) for p in prompts if p.split == "test"}
    train_titles = {(p.adjective, p.noun) for p in prompts if p.split == "train"}
    assert not test_titles & train_titles
    assert len(test_titles) == round(0.2 * (len(test_titles) + len(train_titles)))
    closed = [p.phi for p in prompts if p.family == "closed"]
    open_ = [p.phi for p in prompts if p.family == "open"]
    assert max(closed) < 0.2 < 0.7 < min(open_)
    assert all(p.text.endswith(":") for p in prompts)


def test_closed_responses_follow_the_title_rules_and_open_ones_vary():
    rng = random.Random(0)
    prompts = corpus.make_prompts(0)[:200]
    for p in prompts:
        response = p.respond(rng)
        assert response.startswith(" ")
        if p.family == "closed":
            assert corpus.closed_answer_is_correct(p, response)
    # a closed prompt has a handful of answers, an open one very many
    facts, review = (next(p for p in prompts if p.template == t) for t in ("facts", "review"))
    assert len({facts.respond(rng) for _ in range(200)}) == len(corpus.FACTS_VERDICTS)
    assert len({review.respond(rng) for _ in range(200)}) > 150


def test_reward_is_sentiment_and_varies_in_both_families():
    assert sentiment_reward(" the acting was great.") > 0.3
    assert sentiment_reward(" the acting was awful.") < -0.3
    assert sentiment_reward(" the acting was not great.") < 0
    prompts = corpus.make_prompts(0)
    assert all(sentiment_reward(p.text) == 0.0 for p in prompts[::7])  # titles are neutral
    rng = random.Random(0)
    for family in corpus.FAMILIES:
        responses = [p.respond(rng) for p in prompts if p.family == family][:300]
        assert np.std(sentiment_rewards(responses)) > 0.3, family


# ----------------------------------------------------------------------------- annotators


@pytest.mark.parametrize("phi", [0.05, 0.5, 0.95])
def test_annotator_pair_frequencies_match_the_mallows_marginals(phi):
    n, size = 5, 20_000
    ranks = annotator_ranks(n, phi, size, np.random.default_rng(1))
    for i in range(n):
        for j in range(i + 1, n):
            freq = np.mean(ranks[:, i] < ranks[:, j])
            p = float(pairwise_prob(j - i, phi))
            assert abs(freq - p) < 4.5 * np.sqrt(p * (1 - p) / size) + 1e-9, (i, j, freq, p)


@pytest.mark.parametrize("phi", [0.05, 0.75])
def test_annotated_pair_of_two_picks_the_better_response_at_the_mallows_rate(phi):
    rng = np.random.default_rng(2)
    size = 3_000
    chosen_better = np.mean([annotate([-0.5, 0.7], phi, rng).chosen == 1 for _ in range(size)])
    p = float(pairwise_prob(1, phi))  # = 1 / (1 + phi)
    assert abs(chosen_better - p) < 4.5 * np.sqrt(p * (1 - p) / size)


def test_annotated_pair_is_top_against_bottom_and_ties_are_broken_at_random():
    rng = np.random.default_rng(3)
    pair = annotate([0.1, 0.9, -0.3, 0.5], 1e-9, rng)  # phi ~ 0: the annotator returns mu0
    assert (pair.chosen, pair.rejected) == (1, 2)
    assert (pair.chosen_central_rank, pair.rejected_central_rank) == (0, 3)
    assert pair.annotator_ranking == pair.central_ranking == (1, 3, 0, 2)
    firsts = {int(central_order([0.2, 0.2, -1.0], rng)[0]) for _ in range(50)}
    assert firsts == {0, 1}


def test_first_of_several_annotators_is_the_single_annotator_whatever_their_number():
    rewards = [0.3, -0.2, 0.8, 0.1]
    single = annotate(rewards, 0.6, np.random.default_rng(5))
    for m in (1, 2, 7):
        listed = annotate_list(rewards, 0.6, m, np.random.default_rng(5), np.random.default_rng([5, 1]))
        assert listed.pair == single
        ranks = listed.rankings
        assert ranks.shape == (m, 4) and (np.sort(ranks, axis=1) == np.arange(4)).all()
        assert tuple(np.argsort(ranks[0])) == single.annotator_ranking
        votes = listed.votes()
        assert votes[0] == 1 and set(votes.tolist()) <= {1, -1}
        assert (votes == np.where(ranks[:, single.chosen] < ranks[:, single.rejected], 1, -1)).all()


def test_other_annotators_rank_around_the_reward_order():
    rewards = [0.1, 0.9, -0.3, 0.5]  # best first: 1, 3, 0, 2
    listed = annotate_list(rewards, 1e-9, 4, np.random.default_rng(0), np.random.default_rng(1))
    assert (listed.rankings == [2, 0, 3, 1]).all()  # phi ~ 0: everyone returns mu0
    noisy = annotate_list(rewards, 0.9, 400, np.random.default_rng(0), np.random.default_rng(1)).rankings
    assert 0.35 < np.mean(noisy[:, 1] < noisy[:, 3]) < 0.7  # phi near 1: adjacent pairs near a coin flip


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "5"])
def test_annotators_per_prompt_must_be_a_positive_integer(bad):
    from mallowspo.experiments.world.data import WorldDataConfig

    with pytest.raises(ValueError, match="annotators per prompt"):
        check_annotators(bad)
    with pytest.raises(ValueError, match="annotators per prompt"):
        WorldDataConfig(annotators_per_prompt=bad)
    assert WorldDataConfig().annotators_per_prompt == 5


# ----------------------------------------------------------------------------- a miniature built world


@pytest.fixture(scope="module")
def mini_world(tmp_path_factory):
    from mallowspo.cli import main

    root = tmp_path_factory.mktemp("world")
    assert main(["world", "build", "--mini", "--out", str(root)]) == 0
    return WorldPaths(root)


def test_mini_world_model_loads_with_from_pretrained(mini_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(mini_world.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(mini_world.model_dir)
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    text = "review of the silent harbor: the plot was great."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    report = json.loads(mini_world.manifest.read_text())
    assert report["evaluation"]["heldout_perplexity"] > 1


def test_mini_world_data_is_trl_preference_format(mini_world):
    from datasets import load_dataset

    ds = load_dataset("json", data_files={"train": str(mini_world.train_file), "test": str(mini_world.test_file)})
    assert len(ds["train"]) > 0 and len(ds["test"]) > 0
    row = ds["train"][0]
    for column in ("prompt", "chosen", "rejected", "phi", "family", "chosen_reward", "rejected_reward"):
        assert column in row
    for r in ds["train"]:
        assert r["chosen"] != r["rejected"]
        assert r["family"] in corpus.FAMILIES
        assert r["phi"] == corpus.TEMPLATES_BY_NAME[r["template"]].phi
        assert r["chosen_reward"] == sentiment_reward(r["chosen"])


def test_mini_world_data_is_deterministic_under_its_seed(mini_world, tmp_path):
    from mallowspo.cli import main

    for name, seed in (("a", 0), ("c", 1)):
        args = ["world", "data", "--world", str(mini_world.root), "--seed", str(seed), "--out", str(tmp_path / name)]
        assert main(args) == 0
    read = lambda name: (tmp_path / name / "train.jsonl").read_text() + (tmp_path / name / "test.jsonl").read_text()
    assert read("a") == mini_world.train_file.read_text() + mini_world.test_file.read_text()  # fixture: seed 0
    assert read("a") != read("c")
    # the lists go beside the named directory, never into it (which then loads as pairs)
    assert (tmp_path / "a-lists" / "train.jsonl").read_text() == mini_world.train_lists_file.read_text()
    assert not any(p.name != "report.json" and "list" in p.name for p in (tmp_path / "a").iterdir())


def test_world_data_takes_the_number_of_annotators(mini_world, tmp_path, capsys):
    from mallowspo.cli import main

    args = ["world", "data", "--world", str(mini_world.root), "--out", str(tmp_path / "m3"), "--annotators", "3"]
    assert main(args) == 0
    lists = [json.loads(line) for line in (tmp_path / "m3-lists" / "train.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (tmp_path / "m3" / "train.jsonl").read_text().splitlines()]
    assert {len(r["annotator_rankings"]) for r in lists} == {3} and {len(p["votes"]) for p in pairs} == {3}
    assert (
        main(["world", "data", "--world", str(mini_world.root), "--out", str(tmp_path / "m0"), "--annotators", "0"])
        == 2
    )
    assert "annotators per prompt must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "m0").exists()


def test_mini_world_lists_rank_the_pairs_responses(mini_world):
    pairs = [json.loads(line) for line in mini_world.train_file.read_text().splitlines()]
    lists = [json.loads(line) for line in mini_world.train_lists_file.read_text().splitlines()]
    assert [r["prompt_id"] for r in lists] == [r["prompt_id"] for r in pairs]
    for pair, row in zip(pairs, lists):
        assert row["responses"][row["ranking"][0]] == pair["chosen"]
        assert row["responses"][row["ranking"][-1]] == pair["rejected"]
        assert len(row["annotator_rankings"]) == len(pair["votes"]) == 5
        assert pair["chosen_votes"] + pair["rejected_votes"] == 5


# ----------------------------------------------------------------------------- the shipped world

shipped = WorldPaths(ASSETS_DIR)
needs_shipped = pytest.mark.skipif(not shipped.is_complete(), reason="no world shipped under mallowspo/world/assets")


@needs_shipped
def test_shipped_world_is_small_and_loads():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(shipped.model_dir)
    assert model.dtype == torch.float32
    size = sum(f.stat().st_size for f in shipped.model_dir.iterdir())
    assert size < 10e6
    report = json.loads(shipped.manifest.read_text())
    ev = report["evaluation"]
    assert ev["heldout_perplexity"] < 0.5 * ev["heldout_unigram_perplexity"]


@needs_shipped
def test_shipped_model_is_less_certain_on_open_prompts():
    """The paper's assumption (§3.3): the base model's predictive entropy is lower on
    responses to prompts where annotators agree (closed) than where they disagree (open)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mallowspo.experiments.world.lm import completion_statistics

    model = AutoModelForCausalLM.from_pretrained(shipped.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(shipped.model_dir)
    rows = [json.loads(line) for line in shipped.test_file.read_text().splitlines()]
    entropy = {}
    for family in corpus.FAMILIES:
        chosen = [r for r in rows if r["family"] == family][:40]
        stats = completion_statistics(model, tokenizer, [r["prompt"] for r in chosen], [r["chosen"] for r in chosen])
        entropy[family] = float(stats["mean_entropy"].mean())
        assert np.allclose(stats["mean_entropy"], [r["base_chosen_entropy"] for r in chosen], atol=1e-4)
    assert entropy["closed"] < 0.5 * entropy["open"]


# ----------------------------------------------------------------------------- the full build


@pytest.mark.slow
def test_full_build_is_a_real_language_model_with_an_entropy_gap(tmp_path):
    from mallowspo.experiments.world.build import WorldConfig, build_world_model
    from mallowspo.experiments.world.data import WorldDataConfig, generate_preference_data

    report = build_world_model(tmp_path, WorldConfig())
    ev = report["evaluation"]
    assert ev["heldout_perplexity"] < 0.5 * ev["heldout_unigram_perplexity"]
    data = generate_preference_data(tmp_path, WorldDataConfig())
    assert data["by_family"]["closed"]["sample_entropy"] < 0.5 * data["by_family"]["open"]["sample_entropy"]
    assert data["estimator"]["spearman"] > 0.5
