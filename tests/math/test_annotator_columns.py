"""The annotators dispersion source at the DispersionSource / dispersion_estimate level: its
settings, reading votes, counts, strengths and rankings from column values, the normalisation
and clamp, the prior reused across splits, and one-line errors naming the data row. Oracles: the
estimators of ``annotators`` called on counts made by hand, brute-force Kendall distances, and
rankings simulated from the Kendall model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from mallowspo.annotator_columns import AnnotatorColumns, agreement
from mallowspo.annotators import (
    fit_ranking_prior,
    fit_vote_prior,
    kemeny_distance,
    neg_log_phi_from_rankings,
    neg_log_phi_from_votes,
)
from mallowspo.dispersion import DispersionSource, dispersion_estimate
from mallowspo.mallows import kendall_distance, sample_kendall

CHOSEN = [3, 2, 3, 1, 2, 0, 3, 2]  # votes for chosen of 3 annotators per pair
REJECTED = [0, 1, 0, 2, 1, 3, 0, 1]


def counts_source(**fields) -> DispersionSource:
    return DispersionSource(source="annotators", chosen_votes_column="c", rejected_votes_column="r", **fields)


def estimate(source, annotations, **kwargs):
    size = len(next(iter(annotations.values())))
    return dispersion_estimate(source, size=size, annotations=annotations, **kwargs)


def by_hand(agree, total, consensus="majority", clamp=(0.05, 20.0), prior=None, phi_star=None):
    """The estimate computed from the annotators module: posterior means, phi* = 1 / mean, clamp."""
    agree, total = np.asarray(agree), np.asarray(total)
    prior = prior or fit_vote_prior(agree, total, consensus=consensus)
    raw = neg_log_phi_from_votes(agree, total, prior=prior, consensus=consensus)
    phi_star = phi_star or 1.0 / raw.mean()
    return np.clip(phi_star * raw, *clamp) if clamp else phi_star * raw, phi_star, prior


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, r"dispersion_source 'annotators' needs the annotations: set dispersion_votes_column"),
        ({"chosen_votes_column": "c"}, r"dispersion_chosen_votes_column and dispersion_rejected_votes_column go"),
        ({"votes_column": "v", "rankings_column": "r"}, r"must come from one place, got dispersion_votes_column, "),
        ({"format": "multipref", "votes_column": "v"}, r"dispersion_format 'multipref' writes its own votes column"),
        ({"format": "ultrafeedback"}, r"dispersion_format must be one of \('multipref', 'helpsteer2'\)"),
        ({"votes_column": "v", "consensus": "label"}, r"dispersion_consensus must be one of \('majority', 'given'\)"),
        ({"strengths_column": "s", "consensus": "given"}, r"'given' needs votes for chosen, and strengths are signed"),
        ({"rankings_column": "r", "consensus": "given"}, r"'given' needs .* the rankings' center is always estimated"),
        ({"votes_column": " "}, r"dispersion_votes_column must be a column name, got ' '"),
    ],
)
def test_bad_annotator_settings_are_refused_in_one_line(fields, message):
    with pytest.raises(ValueError, match=message) as error:
        DispersionSource(source="annotators", **fields)
    assert "\n" not in str(error.value)


def test_the_columns_read_are_those_of_the_settings():
    assert counts_source().annotation_columns == ("c", "r")
    assert DispersionSource(source="annotators", format="helpsteer2").annotation_columns == ("annotator_votes",)
    assert DispersionSource(votes_column="v").annotation_columns == ()  # another source reads none
    assert DispersionSource(source="entropy", votes_column="v", consensus="given").source == "entropy"


# ----------------------------------------------------------------------------- votes and counts


def test_counts_give_the_votes_estimate_normalised_and_clamped():
    agree, total = np.maximum(CHOSEN, REJECTED), np.add(CHOSEN, REJECTED)
    expected, phi_star, prior = by_hand(agree, total)
    with pytest.warns(UserWarning, match="2 of 8 pairs have more votes for rejected than for chosen"):
        result = estimate(counts_source(), {"c": CHOSEN, "r": REJECTED})
    torch.testing.assert_close(result.neg_log_phi, torch.as_tensor(expected), rtol=1e-12, atol=0)
    assert result.phi_star == pytest.approx(phi_star) and result.prior == pytest.approx(prior)
    assert float(result.neg_log_phi.mean()) == pytest.approx(1.0)  # nothing clamped here: the mean is 1
    unanimous, split = result.neg_log_phi[0], result.neg_log_phi[1]
    assert unanimous > split and result.neg_log_phi[5] == unanimous  # 0 of 3 for chosen is unanimous too


def test_a_votes_list_counts_as_its_votes_and_ties_are_left_out():
    votes = [[1, 1, 1], [1, None, 0, 1], [True, False, 0.5, True], [0, 0, 1], [1, 0.5]]
    chosen, rejected = [3, 2, 2, 1, 1], [0, 1, 1, 2, 0]
    from_list = estimate(DispersionSource(source="annotators", votes_column="v", consensus="given"), {"v": votes})
    from_counts = estimate(counts_source(consensus="given"), {"c": chosen, "r": rejected})
    torch.testing.assert_close(from_list.neg_log_phi, from_counts.neg_log_phi)
    assert agreement(AnnotatorColumns(votes="v", consensus="given"), {"v": votes})[0].tolist() == chosen


def test_given_consensus_is_signed_and_the_clamp_floor_takes_the_pairs_against_the_label():
    expected, _, _ = by_hand(CHOSEN, np.add(CHOSEN, REJECTED), consensus="given")
    result = estimate(counts_source(consensus="given"), {"c": CHOSEN, "r": REJECTED})
    torch.testing.assert_close(result.neg_log_phi, torch.as_tensor(expected), rtol=1e-12, atol=0)
    assert result.neg_log_phi[5] == 0.05 and result.neg_log_phi[0] > result.neg_log_phi[1]
    with pytest.raises(ValueError, match=r"^data row 15: the annotator estimate of -log phi\(x\) is .* <= 0"):
        estimate(counts_source(consensus="given", clamp=None), {"c": CHOSEN, "r": REJECTED}, rows=range(10, 18))


@pytest.mark.filterwarnings("ignore:.*more votes for rejected:UserWarning")
def test_an_eval_split_reuses_the_train_prior_and_phi_star():
    train = estimate(counts_source(), {"c": CHOSEN, "r": REJECTED})
    other = {"c": [2, 3, 1], "r": [0, 0, 1]}
    reused = estimate(counts_source(), other, prior=train.prior, phi_star=train.phi_star)
    expected, _, _ = by_hand([2, 3, 1], [2, 3, 2], prior=train.prior, phi_star=train.phi_star)
    torch.testing.assert_close(reused.neg_log_phi, torch.as_tensor(expected), rtol=1e-12, atol=0)
    assert reused.prior == train.prior and reused.phi_star == train.phi_star
    refitted = estimate(counts_source(), other)
    assert refitted.prior != train.prior  # fitting there would give another prior
    fixed = estimate(counts_source(normalization=1.0, clamp=None), other, phi_star=train.phi_star)
    assert fixed.phi_star == 1.0  # a fixed normalisation is used as it is


def test_strengths_count_by_sign_in_either_response_order():
    strengths = [
        [-3, -1, -2],
        [2, -1, 3],
        [{"strength": 1}, {"strength": 0}, {"strength": 2}],
        ["A-is-slightly-better"],
    ]
    flipped = [[-s if isinstance(s, int) else s for s in row] for row in strengths]
    source = DispersionSource(source="annotators", strengths_column="s")
    first, second = estimate(source, {"s": strengths}), estimate(source, {"s": flipped})
    torch.testing.assert_close(first.neg_log_phi, second.neg_log_phi)
    expected, _, _ = by_hand([3, 2, 2, 1], [3, 3, 2, 1])
    torch.testing.assert_close(first.neg_log_phi, torch.as_tensor(expected), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "source, values, message",
    [
        (counts_source(), {"c": [2, "x"], "r": [1, 1]}, r"^data row 8: .* 'x' is not a count$"),
        (counts_source(), {"c": [2, 1.5], "r": [1, 1]}, r"^data row 8: .* 1.5 is not a count \(an integer >= 0\)$"),
        (counts_source(), {"c": [2, 0], "r": [1, 0]}, r"^data row 8: .* no annotator preferred either response"),
        (counts_source(), {"c": [2, 1]}, r"dispersion_rejected_votes_column 'r': the data has no column 'r'"),
        ({"votes_column": "v"}, {"v": [[1], [1, 2]]}, r"^data row 8: dispersion_votes_column 'v': entry 1: vote 2 is"),
        ({"votes_column": "v"}, {"v": [[1], 3]}, r"^data row 8: .* int 3 is not a list$"),
        ({"strengths_column": "s"}, {"s": [[1], [-100, 2]]}, r"^data row 8: .* strength -100 is outside -3..3"),
        (
            {"strengths_column": "s"},
            {"s": [[1], ["A-better"]]},
            r"^data row 8: .* unknown preference label 'A-better'",
        ),
        ({"rankings_column": "k"}, {"k": [[[0, 1]], [[1, 1]]]}, r"^data row 8: .* rankings\[8\]\[0\] = \[1, 1\]"),
    ],
)
def test_bad_annotation_values_are_refused_in_one_line_naming_the_data_row(source, values, message):
    source = source if isinstance(source, DispersionSource) else DispersionSource(source="annotators", **source)
    with pytest.raises(ValueError, match=message) as error:
        estimate(source, values, rows=[7, 8])
    assert "\n" not in str(error.value)


def test_votes_given_as_json_text_read_as_the_lists():
    source = DispersionSource(source="annotators", votes_column="v")
    text = estimate(source, {"v": ["[1, 1, 0]", "[1, 1, 1]", "[0, null, 1]"]})
    lists = estimate(source, {"v": [[1, 1, 0], [1, 1, 1], [0, None, 1]]})
    torch.testing.assert_close(text.neg_log_phi, lists.neg_log_phi)


# ----------------------------------------------------------------------------- rankings


def brute_force_kemeny(rankings: np.ndarray) -> int:
    K = rankings.shape[1]
    centers = np.array(list(itertools.permutations(range(K))))
    return int(min(kendall_distance(rankings, c).sum() for c in centers))


def test_kemeny_distance_is_the_least_total_kendall_distance():
    rng = np.random.default_rng(0)
    rows = [np.stack([rng.permutation(K) for _ in range(M)]) for M, K in [(3, 4), (5, 3), (1, 4), (2, 2), (4, 3)]]
    assert kemeny_distance(rows).tolist() == [brute_force_kemeny(r) for r in rows]


def simulated_rankings(truth: np.ndarray, M: int, K: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = []
    for L in truth:  # a random center per prompt: the estimate must not depend on it
        draws = sample_kendall(K, float(np.exp(-L)), M, rng)
        rows.append(draws[:, rng.permutation(K)])
    return rows


def test_rankings_recover_the_order_of_the_true_dispersion():
    truth = np.repeat([0.1, 0.8, 2.5], 40)
    rows = simulated_rankings(truth, M=5, K=4, seed=1)
    result = estimate(DispersionSource(source="annotators", rankings_column="k"), {"k": [r.tolist() for r in rows]})
    means = [float(result.neg_log_phi[i : i + 40].mean()) for i in (0, 40, 80)]
    assert means[0] < means[1] < means[2]
    assert spearmanr(result.neg_log_phi.numpy(), truth).statistic > 0.7
    assert float(result.neg_log_phi.mean()) == pytest.approx(1.0, abs=0.02)  # mean 1 before the clamp cuts little


def test_prompts_with_different_annotator_counts_share_one_prior():
    truth = np.repeat([0.3, 1.5], 30)
    rows = simulated_rankings(truth, M=3, K=3, seed=2) + simulated_rankings(truth, M=5, K=4, seed=3)
    prior = fit_ranking_prior(rows)
    mixed = neg_log_phi_from_rankings(rows, prior=prior)
    three, five = np.stack(rows[:60]), np.stack(rows[60:])
    np.testing.assert_allclose(mixed[:60], neg_log_phi_from_rankings(three, prior=prior), rtol=1e-12)
    np.testing.assert_allclose(mixed[60:], neg_log_phi_from_rankings(five, prior=prior), rtol=1e-12)
    result = estimate(
        DispersionSource(source="annotators", rankings_column="k", normalization=1.0, clamp=None),
        {"k": [r.tolist() for r in rows]},
    )
    np.testing.assert_allclose(result.neg_log_phi.numpy(), mixed, rtol=1e-12)
    assert result.prior == pytest.approx(prior)


@pytest.mark.filterwarnings("ignore:.*more votes for rejected:UserWarning")
def test_pair_rankings_are_the_folded_votes():
    """K = 2: a ranking is a vote (response 0 = chosen), so both columns give the same estimate."""
    votes = [[1, 1, 0], [1, 1, 1], [0, 0, 1], [1, 0, 0], [1, 1, 1]]
    rankings = [[[0, 1] if v else [1, 0] for v in row] for row in votes]
    from_votes = estimate(DispersionSource(source="annotators", votes_column="v"), {"v": votes})
    from_rankings = estimate(DispersionSource(source="annotators", rankings_column="k"), {"k": rankings})
    torch.testing.assert_close(from_rankings.neg_log_phi, from_votes.neg_log_phi, rtol=1e-6, atol=1e-8)
    agree, total = agreement(AnnotatorColumns(rankings="k"), {"k": rankings})
    assert agree.tolist() == [2, 3, 2, 2, 3] and total.tolist() == [3] * 5
