"""The shipped world's lists and annotators (data/ pairs, lists/ rankings, data/report.json):
the pairs are the rows they always were, lists and votes agree with them, and the M
annotators disagree as the Kendall Mallows model at the true phi says. Reads the shipped
files only (a second or two)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from mallowspo.experiments.world.paths import ASSETS_DIR, WorldPaths

shipped = WorldPaths(ASSETS_DIR)
pytestmark = pytest.mark.skipif(
    not (shipped.has_data() and shipped.has_lists()), reason="no world data shipped under experiments/world/assets"
)

# The pair columns as they were before the annotators came, and the sha256 of the files those
# columns made (data/train.jsonl and data/test.jsonl as shipped then, commit 822085a).
PAIR_COLUMNS = (
    "prompt", "chosen", "rejected", "prompt_id", "split", "family", "template", "phi", "neg_log_phi",
    "chosen_reward", "rejected_reward", "chosen_central_rank", "rejected_central_rank", "n_responses",
    "base_chosen_entropy", "base_rejected_entropy",
)  # fmt: skip
PAIR_SHA256 = {
    "train": "943bb145b2740df0b5e68376809614821756f9148d97626b619af3c86fcc4996",
    "test": "cbb3382aa1fa01e20920fa072f10ad58893c79bf9881d3240ee7286c3660aeb6",
}
TRUTH = ("prompt_id", "split", "family", "template", "phi", "neg_log_phi")


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world():
    report = json.loads(shipped.data_report.read_text())
    return {
        "pairs": {"train": read(shipped.train_file), "test": read(shipped.test_file)},
        "lists": {"train": read(shipped.train_lists_file), "test": read(shipped.test_lists_file)},
        "report": report,
        "M": report["data_config"]["annotators_per_prompt"],
    }


def everything(world, kind: str) -> list[dict]:
    return world[kind]["train"] + world[kind]["test"]


# ----------------------------------------------------------------------------- the pairs did not change


@pytest.mark.parametrize("split", ["train", "test"])
def test_pairs_keep_every_old_column_byte_for_byte(world, split):
    old = "".join(json.dumps({k: r[k] for k in PAIR_COLUMNS}) + "\n" for r in world["pairs"][split])
    assert hashlib.sha256(old.encode()).hexdigest() == PAIR_SHA256[split]
    # the new columns come after the old ones, so each old line is a prefix of its new line
    assert all(list(r)[: len(PAIR_COLUMNS)] == list(PAIR_COLUMNS) for r in world["pairs"][split])
    assert all(
        set(r) - set(PAIR_COLUMNS) == {"chosen_votes", "rejected_votes", "votes"} for r in world["pairs"][split]
    )


def test_a_few_pair_rows_are_the_ones_shipped_before(world):
    train, test = world["pairs"]["train"], world["pairs"]["test"]
    assert len(train) == 1220 and len(test) == 304
    expected = [
        (train[0], "facts/silent-harbor", " a drama from the twenties. it is good.",
         " a drama from the twenties. it is bad.", 0.4404, -0.5423),
        (train[3], "review/silent-harbor",
         " the direction was pleasant but the photography was wonderful. i enjoyed the ending.",
         " i enjoyed the dialogue. a somewhat awful film.", 0.9127, 0.1513),
        (test[303], "review/second-archive", " i hated the plot. a funny film.",
         " the script was extremely messy. i hated the script.", -0.3182, -0.8051),
    ]  # fmt: skip
    for row, prompt_id, chosen, rejected, chosen_reward, rejected_reward in expected:
        assert (row["prompt_id"], row["chosen"], row["rejected"]) == (prompt_id, chosen, rejected)
        assert (row["chosen_reward"], row["rejected_reward"]) == (chosen_reward, rejected_reward)
    assert train[0]["prompt"] == "facts about the silent harbor:"


# ----------------------------------------------------------------------------- lists and votes agree with the pairs


def test_lists_are_the_pairs_prompts_with_their_ranked_responses(world):
    for split in ("train", "test"):
        pairs, lists = world["pairs"][split], world["lists"][split]
        assert [r["prompt_id"] for r in lists] == [r["prompt_id"] for r in pairs]
        for pair, row in zip(pairs, lists):
            K = len(row["responses"])
            assert 2 <= K <= 4 and K == pair["n_responses"] == len(row["scores"])
            assert len(set(row["responses"])) == K
            assert {k: row[k] for k in TRUTH} == {k: pair[k] for k in TRUTH} and row["prompt"] == pair["prompt"]
            ranking, center = row["ranking"], row["central_ranking"]
            assert sorted(ranking) == sorted(center) == list(range(K))
            assert row["responses"][ranking[0]] == pair["chosen"] and row["responses"][ranking[-1]] == pair["rejected"]
            assert row["scores"][ranking[0]] == pair["chosen_reward"]
            assert row["scores"][ranking[-1]] == pair["rejected_reward"]
            scores_by_center = [row["scores"][k] for k in center]
            assert scores_by_center == sorted(scores_by_center, reverse=True)  # mu0: best reward first
            assert center.index(ranking[0]) == pair["chosen_central_rank"]
            assert center.index(ranking[-1]) == pair["rejected_central_rank"]
    # closed prompts often have fewer than 4 distinct answers; open ones never do
    assert {len(r["responses"]) for r in everything(world, "lists") if r["family"] == "open"} == {4}
    assert {len(r["responses"]) for r in everything(world, "lists") if r["family"] == "closed"} == {2, 3, 4}


def test_annotator_rankings_and_votes_are_consistent(world):
    M = world["M"]
    assert M == 5
    for pair, row in zip(everything(world, "pairs"), everything(world, "lists")):
        ranks = np.array(row["annotator_rankings"])
        K = len(row["responses"])
        assert ranks.shape == (M, K)
        assert (np.sort(ranks, axis=1) == np.arange(K)).all()
        assert [int(k) for k in np.argsort(ranks[0])] == row["ranking"]  # annotator 1's ranks are the ranking
        chosen, rejected = row["ranking"][0], row["ranking"][-1]
        votes = pair["votes"]
        assert len(votes) == M and set(votes) <= {1, -1} and votes[0] == 1
        assert votes == [1 if r[chosen] < r[rejected] else -1 for r in ranks.tolist()]
        assert pair["chosen_votes"] == votes.count(1) and pair["rejected_votes"] == votes.count(-1)
        assert pair["chosen_votes"] + pair["rejected_votes"] == M


# ----------------------------------------------------------------------------- the annotators follow the Mallows model


def test_annotators_agree_more_on_closed_than_on_open_prompts(world):
    pairs, M = everything(world, "pairs"), world["M"]

    def by_family(fn):
        return {fam: float(np.mean([fn(r) for r in pairs if r["family"] == fam])) for fam in ("closed", "open")}

    others = by_family(lambda r: (r["chosen_votes"] - 1) / (M - 1))  # annotator 1 always votes for its label
    unanimous = by_family(lambda r: r["chosen_votes"] == M)
    assert others["closed"] > 0.85 and others["open"] < 0.6
    assert unanimous["closed"] > 0.7 > 0.15 > unanimous["open"]

    summary = world["report"]["annotators"]
    assert summary["per_prompt"] == M and summary["label"].startswith("first annotator")
    for fam in ("closed", "open"):
        rows = [r for r in pairs if r["family"] == fam]
        entry = summary["by_family"][fam]
        assert entry["pairs"] == len(rows)
        assert math.isclose(entry["vote_agreement_others"], others[fam])
        assert math.isclose(entry["majority_agrees_with_label"], np.mean([r["chosen_votes"] > M / 2 for r in rows]))
        assert math.isclose(entry["vote_agreement"], np.mean([r["chosen_votes"] / M for r in rows]))


def test_adjacent_responses_are_ordered_as_the_center_at_the_kendall_rate(world):
    """Kendall Mallows: two responses adjacent in mu0 keep their order with probability 1/(1 + phi)."""
    for template in ("facts", "genre", "line", "review"):
        rows = [r for r in everything(world, "lists") if r["template"] == template]
        kept = [
            ranks[c] < ranks[d]
            for r in rows
            for ranks in r["annotator_rankings"]
            for c, d in zip(r["central_ranking"], r["central_ranking"][1:])
        ]
        q = 1 / (1 + rows[0]["phi"])
        # pairs within one ranking are not independent: allow sqrt(K - 1) = sqrt(3) on the binomial error
        tolerance = 5 * math.sqrt(3 * q * (1 - q) / len(kept))
        assert abs(np.mean(kept) - q) < tolerance, (template, np.mean(kept), q)
        assert math.isclose(
            world["report"]["annotators"]["by_template"][template]["adjacent_agreement"], np.mean(kept)
        )
