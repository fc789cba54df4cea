"""Listwise losses: K = 2 reductions to the pairwise loss, brute-force Plackett-Luce and
all-pairs oracles, finite-difference gradients, masks and ragged lists, ties, top-k, metrics
and clear errors."""

import importlib
import itertools
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from mallowspo.losses import LOSS_TYPES, ListwiseLossOutput, listwise_loss, preference_loss

f64 = torch.float64
LIKELIHOOD_LOSSES = ("sigmoid", "robust", "simpo")
MALLOWS_SETTINGS = (
    {"mallows": "none"},
    {"mallows": "theta"},
    {"mallows": "phi", "phi_smoothing": "cubic", "smoothing_eps": 0.1},
    {"mallows": "phi", "phi_smoothing": "cubic", "smoothing_eps": "adaptive"},
    {"mallows": "phi", "phi_smoothing": "sigmoid"},
    {"mallows": "phi", "phi_smoothing": "none"},
)
ALL_PAIRWISE_OPTIONS = [
    {"loss_type": loss_type, **mallows, "label_smoothing": eps, "length_normalize": normalize}
    for loss_type, mallows, eps, normalize in itertools.product(
        LOSS_TYPES, MALLOWS_SETTINGS, (0.0, 0.1), (False, True)
    )
    if mallows["mallows"] != "phi" or loss_type in LIKELIHOOD_LOSSES
] + [{"loss_type": "ipo", "mallows": "theta", "ipo_form": form} for form in ("scaled_margin", "scaled_beta")]


def option_id(options):
    return "-".join(str(v) for v in options.values())


def make(B, K, seed=0, scale=2.0):
    """Random (B, K) log-probs, lengths and (B,) dispersions, float64."""
    g = torch.Generator().manual_seed(seed)
    return {
        "policy": scale * torch.randn(B, K, generator=g, dtype=f64),
        "ref": scale * torch.randn(B, K, generator=g, dtype=f64),
        "lengths": torch.randint(1, 20, (B, K), generator=g),
        "neg_log_phi": 0.2 + 2.8 * torch.rand(B, generator=g, dtype=f64),
    }


def random_ranks(B, K, seed=0):
    """(B, K) ranks, each row a random permutation of 0..K-1 (no ties)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(K, generator=g) for _ in range(B)])


def run(d, ranks, **options):
    return listwise_loss(d["policy"], d["ref"], ranks, lengths=d["lengths"], neg_log_phi=d["neg_log_phi"], **options)


# ----------------------------------------------------------------------------- oracles


def brute_plackett_luce_nll(scores, ranks, top_k=None):
    """-log prod_{i < top_k} e^{s_(i)} / sum_{j >= i} e^{s_(j)}, by explicit loops (no ties)."""
    order = sorted(range(len(scores)), key=lambda k: ranks[k])
    stages = len(order) - 1 if top_k is None else top_k
    prob = 1.0
    for i in range(stages):
        prob *= math.exp(scores[order[i]]) / sum(math.exp(scores[order[j]]) for j in range(i, len(order)))
    return -math.log(prob)


def brute_grouped_plackett_luce_nll(scores, ranks):
    """Ties as one stage choosing the group G from R (the group and all below): -sum log(sum_G e^s / sum_R e^s)."""
    nll = 0.0
    for level in sorted(set(ranks)):
        group = sum(math.exp(s) for s, r in zip(scores, ranks) if r == level)
        risk = sum(math.exp(s) for s, r in zip(scores, ranks) if r >= level)
        nll -= math.log(group / risk)
    return nll


def brute_all_pairs(d, ranks, mask, **options):
    """Per row, the mean of preference_loss over every pair (i above j), by explicit double loops."""
    out = []
    for b in range(ranks.shape[0]):
        losses = []
        for i in range(ranks.shape[1]):
            for j in range(ranks.shape[1]):
                if not (mask[b, i] and mask[b, j] and ranks[b, i] < ranks[b, j]):
                    continue
                pick = lambda x, k: x[b, k : k + 1]  # noqa: B023
                losses.append(
                    preference_loss(
                        pick(d["policy"], i),
                        pick(d["policy"], j),
                        pick(d["ref"], i),
                        pick(d["ref"], j),
                        neg_log_phi=d["neg_log_phi"][b : b + 1],
                        chosen_lengths=pick(d["lengths"], i),
                        rejected_lengths=pick(d["lengths"], j),
                        **options,
                    ).losses.item()
                )
        out.append(sum(losses) / len(losses))
    return torch.tensor(out, dtype=f64)


# ----------------------------------------------------------------------------- K = 2


K2_RANKS = torch.tensor([[0, 1], [1, 0], [2, 5], [7, 3]])


def as_pairs(d, ranks):
    """Chosen / rejected columns of a K = 2 batch, by rank."""
    chosen = (ranks[:, 1] < ranks[:, 0]).long()[:, None]
    rejected = 1 - chosen
    take = lambda x, c: x.gather(1, c).squeeze(1)
    return {
        "policy_chosen_logps": take(d["policy"], chosen),
        "policy_rejected_logps": take(d["policy"], rejected),
        "ref_chosen_logps": take(d["ref"], chosen),
        "ref_rejected_logps": take(d["ref"], rejected),
        "chosen_lengths": take(d["lengths"], chosen),
        "rejected_lengths": take(d["lengths"], rejected),
        "neg_log_phi": d["neg_log_phi"],
    }


@pytest.mark.parametrize("options", ALL_PAIRWISE_OPTIONS, ids=option_id)
def test_all_pairs_with_two_responses_is_preference_loss(options):
    d = make(4, 2, seed=1)
    expected = preference_loss(**as_pairs(d, K2_RANKS), beta=0.5, **options)
    got = run(d, K2_RANKS, objective="all_pairs", beta=0.5, **options)
    assert torch.allclose(got.losses, expected.losses, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got.best_rewards, expected.chosen_rewards, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got.worst_rewards, expected.rejected_rewards, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mallows", ["none", "theta"])
@pytest.mark.parametrize("length_normalize", [False, True])
def test_plackett_luce_with_two_responses_is_dpo(mallows, length_normalize):
    d = make(4, 2, seed=2)
    options = {"mallows": mallows, "length_normalize": length_normalize, "beta": 0.3}
    expected = preference_loss(**as_pairs(d, K2_RANKS), **options).losses
    got = run(d, K2_RANKS, objective="plackett_luce", **options).losses
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- brute force


@pytest.mark.parametrize("mallows", ["none", "theta"])
@pytest.mark.parametrize("top_k", [None, 1, 2, 3])
def test_plackett_luce_matches_brute_force_products_of_choice_probabilities(mallows, top_k):
    d = make(5, 4, seed=3)
    ranks = random_ranks(5, 4, seed=3)
    beta = 0.4
    got = run(d, ranks, objective="plackett_luce", beta=beta, mallows=mallows, top_k=top_k).losses
    for b in range(5):
        scale = beta * (d["neg_log_phi"][b].item() if mallows == "theta" else 1.0)
        scores = [scale * (p - r) for p, r in zip(d["policy"][b].tolist(), d["ref"][b].tolist())]
        assert got[b].item() == pytest.approx(brute_plackett_luce_nll(scores, ranks[b].tolist(), top_k), rel=1e-12)


def test_plackett_luce_probabilities_of_all_rankings_sum_to_one():
    d = make(1, 4, seed=4)
    perms = list(itertools.permutations(range(4)))
    ranks = torch.tensor(perms)
    batch = {k: v.expand(len(perms), *v.shape[1:]) for k, v in d.items()}
    losses = run(batch, ranks, beta=0.7).losses
    assert torch.exp(-losses).sum().item() == pytest.approx(1.0, abs=1e-12)
    scores = (0.7 * (d["policy"][0] - d["ref"][0])).tolist()
    assert sum(math.exp(-brute_plackett_luce_nll(scores, list(p))) for p in perms) == pytest.approx(1.0, abs=1e-12)


ORACLE_OPTIONS = [
    {"loss_type": "sigmoid", "mallows": "none"},
    {"loss_type": "sigmoid", "mallows": "theta", "label_smoothing": 0.2},
    {"loss_type": "robust", "mallows": "phi", "label_smoothing": 0.1},
    {"loss_type": "ipo", "mallows": "theta"},
    {"loss_type": "hinge", "mallows": "none"},
    {"loss_type": "simpo", "mallows": "phi", "smoothing_eps": "adaptive"},
    {"loss_type": "sigmoid", "mallows": "phi", "phi_smoothing": "none", "length_normalize": True},
]


@pytest.mark.parametrize("options", ORACLE_OPTIONS, ids=option_id)
def test_all_pairs_matches_explicit_double_loop_with_ties_and_masks(options):
    d = make(3, 5, seed=5)
    ranks = torch.tensor([[3, 0, 1, 1, 4], [0, 2, 2, 1, 9], [4, 4, 0, 1, 2]])
    mask = torch.tensor([[True] * 5, [True, True, True, True, False], [True, False, True, True, True]])
    got = run(d, ranks, objective="all_pairs", mask=mask, beta=0.3, **options).losses
    assert torch.allclose(got, brute_all_pairs(d, ranks, mask, beta=0.3, **options), rtol=1e-12, atol=1e-12)


def test_all_pairs_sigmoid_is_the_textbook_mean_of_log_sigmoids():
    d = make(2, 4, seed=6)
    ranks = random_ranks(2, 4, seed=6)
    got = run(d, ranks, objective="all_pairs", beta=0.5).losses
    for b in range(2):
        r = [0.5 * (p - q) for p, q in zip(d["policy"][b].tolist(), d["ref"][b].tolist())]
        pairs = [(i, j) for i in range(4) for j in range(4) if ranks[b, i] < ranks[b, j]]
        expected = sum(math.log1p(math.exp(-(r[i] - r[j]))) for i, j in pairs) / len(pairs)
        assert got[b].item() == pytest.approx(expected, rel=1e-12)


def test_each_prompt_weighs_one_whatever_its_number_of_pairs():
    # Equal rewards: every pair costs log 2 under DPO, so a prompt costs log 2 whether it has
    # 1, 3 or 10 pairs: its pairs share one unit of weight.
    policy = torch.zeros(3, 5, dtype=f64)
    ranks = torch.tensor([[0, 1, 9, 9, 9], [0, 1, 1, 2, 9], [0, 1, 2, 3, 4]])
    mask = torch.tensor([[True, True, False, False, False], [True, True, True, True, False], [True] * 5])
    losses = listwise_loss(policy, policy, ranks, objective="all_pairs", mask=mask).losses
    assert torch.allclose(losses, torch.full((3,), math.log(2.0), dtype=f64), rtol=1e-14)


# ----------------------------------------------------------------------------- gradients


GRAD_OPTIONS = [
    {"objective": "plackett_luce", "mallows": "none"},
    {"objective": "plackett_luce", "mallows": "theta", "top_k": 2},
    {"objective": "all_pairs", "loss_type": "sigmoid", "mallows": "theta", "label_smoothing": 0.1},
    {"objective": "all_pairs", "loss_type": "robust", "mallows": "none", "label_smoothing": 0.2},
    {"objective": "all_pairs", "loss_type": "ipo", "mallows": "theta"},
    {"objective": "all_pairs", "loss_type": "simpo", "mallows": "theta"},
    {"objective": "all_pairs", "loss_type": "sigmoid", "mallows": "phi", "phi_smoothing": "cubic"},
    {"objective": "all_pairs", "loss_type": "sigmoid", "mallows": "phi", "phi_smoothing": "none"},
]


@pytest.mark.parametrize("options", GRAD_OPTIONS, ids=option_id)
def test_gradients_match_finite_differences(options):
    d = make(2, 4, seed=7, scale=1.0)
    ranks = torch.tensor([[1, 1, 0, 2], [0, 1, 2, 5]])
    mask = torch.tensor([[True] * 4, [True, True, False, True]])

    def f(policy, ref):
        return listwise_loss(
            policy, ref, ranks, mask=mask, lengths=d["lengths"], neg_log_phi=d["neg_log_phi"], beta=0.5, **options
        ).losses

    inputs = (d["policy"].clone().requires_grad_(), d["ref"].clone().requires_grad_())
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


# ----------------------------------------------------------------------------- masks and ragged lists


RAGGED_OPTIONS = [
    {"objective": "plackett_luce", "mallows": "none"},
    {"objective": "plackett_luce", "mallows": "theta", "top_k": 2, "length_normalize": True},
    {"objective": "all_pairs", "loss_type": "sigmoid", "mallows": "none"},
    {"objective": "all_pairs", "loss_type": "robust", "mallows": "theta", "label_smoothing": 0.1},
    {"objective": "all_pairs", "loss_type": "ipo", "mallows": "none"},
    {"objective": "all_pairs", "loss_type": "hinge", "mallows": "theta"},
    {"objective": "all_pairs", "loss_type": "simpo", "mallows": "phi"},
    {"objective": "all_pairs", "loss_type": "sigmoid", "mallows": "phi", "smoothing_eps": "adaptive"},
]


@pytest.mark.parametrize("options", RAGGED_OPTIONS, ids=option_id)
def test_ragged_rows_equal_their_unpadded_computation_whatever_the_masked_slots_hold(options):
    d = make(3, 5, seed=8)
    ranks = torch.tensor([[4, 0, 3, 1, 2], [2, -7, 0, 10**6, 1], [1, 0, 0, 0, 0]])
    mask = torch.tensor([[True] * 5, [True, False, True, False, True], [True, True, False, False, False]])
    garbage = dict(d)
    garbage["policy"] = d["policy"].masked_fill(~mask, math.nan)
    garbage["ref"] = d["ref"].masked_fill(~mask, math.inf)
    garbage["lengths"] = d["lengths"].masked_fill(~mask, 0)
    policy = garbage["policy"].clone().requires_grad_()
    ref = garbage["ref"].clone().requires_grad_()
    out = run({**garbage, "policy": policy, "ref": ref}, ranks, mask=mask, beta=0.4, **options)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all()
    if ref.grad is None:  # SimPO is reference-free: the reference takes no part
        assert options["loss_type"] == "simpo"
        ref.grad = torch.zeros_like(ref)
    assert torch.isfinite(policy.grad).all() and torch.isfinite(ref.grad).all()
    assert (policy.grad[~mask] == 0).all() and (ref.grad[~mask] == 0).all()

    for b in range(3):
        keep = mask[b]
        row = {k: v[b : b + 1, keep].clone() if v.dim() == 2 else v[b : b + 1] for k, v in d.items()}
        row["policy"].requires_grad_()
        row["ref"].requires_grad_()
        row_options = dict(options)
        if row_options.get("top_k") is not None:
            row_options["top_k"] = min(row_options["top_k"], int(keep.sum()) - 1)
        alone = run(row, ranks[b : b + 1, keep], beta=0.4, **row_options)
        alone.losses.sum().backward()
        assert torch.allclose(out.losses[b], alone.losses[0], rtol=1e-12, atol=1e-14)
        assert torch.allclose(policy.grad[b, keep], row["policy"].grad[0], rtol=1e-12, atol=1e-14)
        if options.get("loss_type") != "simpo":
            assert torch.allclose(ref.grad[b, keep], row["ref"].grad[0], rtol=1e-12, atol=1e-14)
        assert torch.allclose(out.rewards[b, keep], alone.rewards[0], rtol=1e-12)
    assert torch.isnan(out.rewards[~mask]).all()


# ----------------------------------------------------------------------------- ties


def swap_columns(x, i, j):
    x = x.clone()
    x[:, [i, j]] = x[:, [j, i]]
    return x


@pytest.mark.parametrize("objective", ["plackett_luce", "all_pairs"])
def test_tied_responses_are_not_ordered_by_position(objective):
    # Responses 1 and 2 are tied. Swapping them (their log-probs move, the ranks stay) must
    # not change the loss; breaking the tie by position would give (1 above 2) one time and
    # (2 above 1) the other, and the two losses would differ.
    d = make(2, 4, seed=9)
    ranks = torch.tensor([[0, 1, 1, 2], [1, 0, 0, 2]])
    swapped = {k: swap_columns(v, 1, 2) if v.dim() == 2 else v for k, v in d.items()}
    loss = run(d, ranks, objective=objective, beta=0.5).losses
    assert torch.allclose(loss, run(swapped, ranks, objective=objective, beta=0.5).losses, rtol=1e-13)
    broken = run(d, torch.tensor([[0, 1, 2, 3], [2, 0, 1, 3]]), objective=objective, beta=0.5).losses
    assert not torch.allclose(loss, broken, rtol=1e-3)


def test_all_pairs_forms_no_pair_from_a_tie():
    d = make(1, 3, seed=10)
    tied = run(d, torch.tensor([[0, 1, 1]]), objective="all_pairs", beta=0.5).losses
    r = (0.5 * (d["policy"][0] - d["ref"][0])).tolist()
    expected = (math.log1p(math.exp(r[1] - r[0])) + math.log1p(math.exp(r[2] - r[0]))) / 2
    assert tied.item() == pytest.approx(expected, rel=1e-12)


def test_plackett_luce_ties_are_one_stage_choosing_the_group():
    d = make(4, 5, seed=11)
    ranks = torch.tensor([[0, 1, 1, 2, 3], [0, 0, 1, 2, 2], [2, 2, 2, 0, 1], [5, 5, 0, 0, 3]])
    got = run(d, ranks, beta=0.6).losses
    for b in range(4):
        scores = (0.6 * (d["policy"][b] - d["ref"][b])).tolist()
        assert got[b].item() == pytest.approx(brute_grouped_plackett_luce_nll(scores, ranks[b].tolist()), rel=1e-12)
    # A tie at the bottom says nothing and costs nothing: [0, 1, 1] is the first stage alone.
    bottom = run(make(1, 3, seed=12), torch.tensor([[0, 1, 1]]), beta=1.0, top_k=1).losses
    assert torch.allclose(run(make(1, 3, seed=12), torch.tensor([[0, 1, 1]]), beta=1.0).losses, bottom, rtol=1e-14)


# ----------------------------------------------------------------------------- metrics and dtypes


def test_rewards_and_metrics():
    policy = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 5.0, 0.0]], dtype=f64)
    ref = torch.zeros_like(policy)
    ranks = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [0, 0, 1, 9]])
    mask = torch.tensor([[True] * 4, [True] * 4, [True, True, True, False]])
    out = listwise_loss(policy, ref, ranks, mask=mask, beta=0.5)
    assert isinstance(out, ListwiseLossOutput)
    assert torch.equal(out.rewards[:2], 0.5 * policy[:2])
    assert torch.isnan(out.rewards[2, 3]) and torch.equal(out.rewards[2, :3], 0.5 * policy[2, :3])
    # Row 2: pairs (0, 2) and (1, 2), both inverted; the tie (0, 1) is no pair.
    assert torch.equal(out.kendall_tau, torch.tensor([1.0, -1.0, -1.0], dtype=f64))
    assert torch.equal(out.best_rewards, torch.tensor([1.5, 0.0, 0.5], dtype=f64))  # row 2: tied best averaged
    assert torch.equal(out.worst_rewards, torch.tensor([0.0, 1.5, 2.5], dtype=f64))
    assert not out.rewards.requires_grad and not out.kendall_tau.requires_grad


@pytest.mark.parametrize("objective", ["plackett_luce", "all_pairs"])
def test_float16_is_computed_in_float32(objective):
    d = make(3, 4, seed=13)
    ranks = random_ranks(3, 4, seed=13)
    half = run({**d, "policy": d["policy"].half(), "ref": d["ref"].half()}, ranks, objective=objective)
    full = run(
        {**d, "policy": d["policy"].half().double(), "ref": d["ref"].half().double()}, ranks, objective=objective
    )
    assert half.losses.dtype == torch.float32 and half.rewards.dtype == torch.float32
    assert torch.allclose(half.losses.double(), full.losses, rtol=1e-5)


def test_importing_either_module_first_works(monkeypatch):
    # losses re-exports listwise_loss from its last line and listwise imports losses from its
    # last line: both orders must load. The modules are re-run fresh, then restored.
    import mallowspo

    for name in ("mallowspo.listwise", "mallowspo.losses"):
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(mallowspo, "losses", None, raising=False)
    monkeypatch.setattr(mallowspo, "listwise", None, raising=False)
    listwise = importlib.import_module("mallowspo.listwise")
    assert listwise.preference_loss is sys.modules["mallowspo.losses"].preference_loss
    for name in ("mallowspo.listwise", "mallowspo.losses"):
        del sys.modules[name]
    losses = importlib.import_module("mallowspo.losses")
    assert losses.listwise_loss is sys.modules["mallowspo.listwise"].listwise_loss


# ----------------------------------------------------------------------------- errors


BAD_INPUTS = [
    ({"objective": "listnet"}, "unknown listwise objective 'listnet'"),
    ({"loss_type": "ipo"}, "plackett_luce' supports loss_type='sigmoid' with mallows 'none' or 'theta'"),
    ({"mallows": "phi"}, "use objective='all_pairs' for the others"),
    ({"label_smoothing": 0.1}, "no label_smoothing"),
    ({"objective": "all_pairs", "top_k": 2}, "top_k applies to objective='plackett_luce' only"),
    ({"top_k": 0}, r"top_k must be an integer in \[1, K - 1\] = \[1, 3\]"),
    ({"top_k": 4}, r"top_k must be an integer in \[1, K - 1\]"),
    ({"top_k": True}, r"top_k must be an integer"),
    ({"ranks": torch.zeros(2, 4)}, "ranks must be an integer tensor"),
    ({"ranks": torch.tensor([[0, 1, 2, 3], [0, -1, 2, 3]])}, "ranks must be >= 0"),
    ({"ranks": torch.zeros(2, 3, dtype=torch.long)}, r"ranks must be a tensor of shape \(2, 4\)"),
    ({"ref_logps": None}, "loss_type='sigmoid' needs ref_logps of shape"),
    ({"ref_logps": torch.zeros(4, 2)}, r"ref_logps must be a tensor of shape \(2, 4\)"),
    ({"policy_logps": torch.zeros(8)}, r"policy_logps must be a \(B, K\) tensor"),
    ({"mallows": "theta", "neg_log_phi": None}, "mallows='theta' needs neg_log_phi of shape"),
    ({"mallows": "theta", "neg_log_phi": torch.ones(2, 1)}, r"neg_log_phi must be a tensor of shape \(2,\)"),
    ({"mask": torch.ones(2, 4)}, "mask must be a bool tensor"),
    ({"mask": torch.ones(2, 5, dtype=torch.bool)}, r"mask must be a tensor of shape \(2, 4\)"),
    ({"length_normalize": True}, "length_normalize=True needs lengths of shape"),
    ({"objective": "all_pairs", "loss_type": "simpo"}, "length_normalize=True needs lengths"),
    ({"ranks": torch.tensor([[0, 1, 2, 3], [1, 1, 1, 1]])}, r"row\(s\) \[1\] have fewer than 2 distinct ranks"),
    (
        {"mask": torch.tensor([[True, False, False, False], [True] * 4])},
        r"row\(s\) \[0\] have fewer than 2 distinct ranks",
    ),
    ({"beta": 0.0}, "beta must be > 0"),
]


@pytest.mark.parametrize("change, message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_inputs_raise_one_line_errors(change, message):
    args = {
        "policy_logps": torch.zeros(2, 4),
        "ref_logps": torch.zeros(2, 4),
        "ranks": torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]),
        **change,
    }
    with pytest.raises(ValueError, match=message) as error:
        listwise_loss(args.pop("policy_logps"), args.pop("ref_logps"), args.pop("ranks"), **args)
    assert "\n" not in str(error.value)


def test_plackett_luce_with_two_responses_is_the_textbook_dpo_formula():
    d = make(4, 2, seed=14)
    pairs = as_pairs(d, K2_RANKS)
    gap = (pairs["policy_chosen_logps"] - pairs["ref_chosen_logps"]) - (
        pairs["policy_rejected_logps"] - pairs["ref_rejected_logps"]
    )
    assert torch.allclose(run(d, K2_RANKS, beta=0.2).losses, -F.logsigmoid(0.2 * gap), rtol=1e-12)
