"""The layout groups of the benchmark: batches whose shape differs from the main table's by design.

- ``layout-packed-``: mallowspo phi (precomputed reference) on length-skewed data (``Workload.skewed``:
  in every batch one pair has the full lengths and the others 1/8 of them), in padded rows
  (``mpo_phi_pre``) and packed into one row (``mpo_phi_pre_packed``, ``padding_free=True``). The data
  set is one batch of pairs (``n_pairs = batch_pairs``), so that every step, whatever the trainer's
  shuffling, sees that one batch and its real-token fraction is the workload's.
- ``layout-lists-``: the same prompts as pairs (each list's best against its worst, ``mpo_phi_pre``) and
  as ranked lists of K = 4 responses: ``objective="all_pairs"`` with mallows phi (``mpo_phi_pre_lists``)
  and ``objective="plackett_luce"`` with mallows theta (``mpo_theta_pre_pl``), ``batch_pairs`` prompts per
  step: K sequences per prompt against 2. Then, once, the reference pass per response
  (``refpass_lists``): the list pass over the lists against the pair pass over the pairs.

This module builds the groups' jobs (through ``run.py``'s job maker), summarises them, adds their
target rows and renders their report sections; ``run.py`` runs them in the same run as the main table
(``--no-layouts`` skips them).
"""

from __future__ import annotations

from common import Workload, fmt, median, memory_ratio, paired_ratio, target_row

PACKED_PREFIX, LISTS_PREFIX = "layout-packed-", "layout-lists-"
PACKED_SYSTEMS = ("mpo_phi_pre", "mpo_phi_pre_packed")
LIST_SYSTEMS = ("mpo_phi_pre", "mpo_phi_pre_lists", "mpo_theta_pre_pl")
LIST_SIZE = 4
# The listwise systems: (objective, mallows) and their report label.
LISTWISE = {
    "mpo_phi_pre_lists": ("all_pairs", "phi"),
    "mpo_theta_pre_pl": ("plackett_luce", "theta"),
}
LABELS = {
    "mpo_phi_pre": "mallowspo phi, padded rows",
    "mpo_phi_pre_packed": "mallowspo phi, padding_free (one packed row)",
}
PACKED_SLACK, PACKED_SPEEDUP, LIST_BOUND = 1.10, 1.50, 2.20


# ----------------------------------------------------------------------------- workloads and jobs


def packed_workload(w: Workload) -> Workload:
    """``w`` with length-skewed data, one batch of it (every step the same batch, whatever the order)."""
    return w.with_(skewed=True, n_pairs=w.batch_pairs)


def lists_workload(w: Workload) -> Workload:
    return w.with_(list_size=LIST_SIZE)


def workloads(w: Workload) -> list[Workload]:
    return [packed_workload(w), lists_workload(w)]


def groups(w: Workload, rounds: int, jobs) -> list[tuple[str, Workload, list[dict]]]:
    """(label, workload, jobs) of the two groups; ``jobs(systems, workload, prefix, rounds)`` schedules
    ``systems`` in interleaved rounds (``run.schedule``). The list reference pass runs once."""
    packed, lists = workloads(w)
    list_jobs = jobs(LIST_SYSTEMS, lists, LISTS_PREFIX, rounds) + jobs(("refpass_lists",), lists, LISTS_PREFIX, 1)
    return [
        (PACKED_PREFIX, packed, jobs(PACKED_SYSTEMS, packed, PACKED_PREFIX, rounds)),
        (LISTS_PREFIX, lists, list_jobs),
    ]


# ----------------------------------------------------------------------------- summaries


def token_counts(w: Workload) -> tuple[int, int]:
    """(real, padded) tokens of one batch of ``batch_pairs`` pairs in data order: the padded batch is
    2 x batch_pairs rows of its longest sequence."""
    lengths = [sum(w.pair_lengths(i)) for i in range(w.batch_pairs)]
    return 2 * sum(lengths), 2 * w.batch_pairs * max(lengths)


def summarise_refpass_lists(ok: list[dict]) -> dict:
    """``run.summarise``'s entry of ``refpass_lists``: medians over its measurements."""
    results = [r["result"] for r in ok]
    return {
        "lists_s_per_response": median([r["lists_s_per_response"] for r in results]),
        "pairs_s_per_response": median([r["pairs_s_per_response"] for r in results]),
        "lists_s": median([t for r in results for t in r["lists_s"]]),
        "pairs_s": median([t for r in results for t in r["pairs_s"]]),
        "responses": results[0]["responses"] if results else None,
        "ratio": median([median(r["round_ratios"]) for r in results]),
        "round_ratios": [x for r in results for x in r["round_ratios"]],
        "logps_match": all(r["logps_match"] for r in results),
    }


def _system_figures(summary: dict, system: str, base: str) -> dict:
    """Step time, memory and first batch of ``system``, and its step-time ratio to ``base`` (paired by round)."""
    info = summary.get(system, {})
    ratio, spread = paired_ratio(summary, system, base)
    return dict(
        system=system,
        median_step_s=info.get("median_step_s"),
        round_medians=info.get("round_medians", []),
        peak_mib=info.get("peak_mib"),
        batch=info.get("batch"),
        errors=info.get("errors", []),
        ratio=ratio,
        spread=spread,
        memory_ratio=memory_ratio(summary, system, base),
    )


def packed_figures(summary: dict, w: Workload) -> dict:
    """The padding_free group: both layouts, packed / padded (by round), the real-token fraction and the
    two derived figures of the targets, packed / (fraction x padded) and padded / packed."""
    real, padded = token_counts(w)
    fraction = real / padded
    packed = _system_figures(summary, "mpo_phi_pre_packed", "mpo_phi_pre")
    batch = summary.get("mpo_phi_pre", {}).get("batch") or {}
    measured = batch["real_tokens"] / batch["padded_tokens"] if batch.get("padded_tokens") else None
    ratio, spread = packed["ratio"], packed["spread"]
    return dict(
        workload=w.to_dict(),
        description=w.describe(),
        real_tokens=real,
        padded_tokens=padded,
        real_token_fraction=fraction,
        measured_real_token_fraction=measured,
        padding_factor=padded / real,
        padded=_system_figures(summary, "mpo_phi_pre", "mpo_phi_pre"),
        packed=packed,
        packed_over_bound=ratio / fraction if ratio else None,
        packed_over_bound_spread=[x / fraction for x in spread],
        speedup=1 / ratio if ratio else None,
        speedup_spread=[1 / x for x in spread if x],
    )


def lists_figures(summary: dict, w: Workload) -> dict:
    """The listwise group: pairwise and each listwise system against it, and the reference pass per response."""
    return dict(
        workload=w.to_dict(),
        description=w.describe(),
        list_size=w.list_size,
        pairwise=_system_figures(summary, "mpo_phi_pre", "mpo_phi_pre"),
        listwise=[
            dict(_system_figures(summary, system, "mpo_phi_pre"), objective=objective, mallows=mallows)
            for system, (objective, mallows) in LISTWISE.items()
        ],
        refpass=summary.get("refpass_lists", {}),
    )


def figures(summaries: dict[str, dict], w: Workload) -> dict:
    """Both groups' figures from their ``run.summarise`` summaries (by group label); {} where not run."""
    packed, lists = workloads(w)
    out = {}
    if PACKED_PREFIX in summaries:
        out["packed"] = packed_figures(summaries[PACKED_PREFIX], packed)
    if LISTS_PREFIX in summaries:
        out["lists"] = lists_figures(summaries[LISTS_PREFIX], lists)
    return out


def targets(figs: dict) -> list[dict]:
    """The groups' rows of the targets table."""
    rows = []
    packed = figs.get("packed")
    if packed:
        factor = packed["padding_factor"]
        rows.append(
            target_row(
                "padding_free step / (real-token fraction x padded step), length-skewed data",
                packed["packed_over_bound"],
                "<=",
                PACKED_SLACK,
                packed["packed_over_bound_spread"],
                f"real-token fraction {packed['real_token_fraction']:.3f}",
            )
        )
        rows.append(
            target_row(
                "padded step / padding_free step, length-skewed data",
                packed["speedup"],
                ">=",
                PACKED_SPEEDUP,
                packed["speedup_spread"],
                f"padding {factor:.2f}x here; the target assumes >= 2x",
            )
        )
    lists = figs.get("lists")
    for row in lists["listwise"] if lists else ():
        rows.append(
            target_row(
                f"step time: {row['objective']} K={lists['list_size']} / pairwise (same prompts)",
                row["ratio"],
                "<=",
                LIST_BOUND,
                row["spread"],
                f"mallows {row['mallows']}; about 2x: twice the sequences, not more",
            )
        )
    return rows


def shape_problems(entries_by_group: dict[str, list[dict]]) -> list[str]:
    """What the layout groups' first batches say is wrong: the packed and padded systems must score the
    same completion tokens, and a listwise batch must hold K sequences per prompt."""
    problems = []
    first = {
        label: {e["system"]: e["result"]["batch"] for e in entries if e.get("result", {}).get("batch")}
        for label, entries in entries_by_group.items()
    }
    packed = first.get(PACKED_PREFIX, {})
    tokens = {s: packed[s]["completion_tokens"] for s in PACKED_SYSTEMS if s in packed}
    if len(set(tokens.values())) > 1:
        problems.append(f"{PACKED_PREFIX}: padded and packed rows scored different completion tokens: {tokens}")
    lists = first.get(LISTS_PREFIX, {})
    for system in LISTWISE:
        batch = lists.get(system)
        pairwise = lists.get("mpo_phi_pre")
        if batch and pairwise and 2 * batch["sequences"] != LIST_SIZE * pairwise["sequences"]:
            problems.append(
                f"{LISTS_PREFIX}: {system} computed {batch['sequences']} sequences per step, not "
                f"K = {LIST_SIZE} per prompt (the pairwise system: {pairwise['sequences']}, 2 per prompt)"
            )
    return problems


# ----------------------------------------------------------------------------- report


def _ratios(values) -> str:
    return ", ".join(f"{x:.3f}" for x in values)


def _step_row(label: str, row: dict, extra: str) -> str:
    batch = row["batch"] or {}
    if row["errors"] and row["median_step_s"] is None:
        return f"| {label} | error | | | | | {extra}"
    return (
        f"| {label} | {fmt(row['median_step_s'], 4)} | {', '.join(fmt(x, 4) for x in row['round_medians'])} | "
        f"{fmt(row['peak_mib'], 0)} | {batch.get('sequences', 'n/a')} | {batch.get('padded_tokens', 'n/a')} | {extra}"
    )


def render_packed(packed: dict, mem_name: str) -> list[str]:
    L = ["## padding_free on length-skewed data\n"]
    L.append(
        f"{packed['description']}; one batch of {packed['workload']['n_pairs']} pairs, the same every step. "
        "mallowspo phi with precomputed reference in padded rows and with `padding_free=True` (the batch's "
        "sequences packed into one row), interleaved by round as the main table. Real tokens of a batch: "
        f"{packed['real_tokens']} of {packed['padded_tokens']} padded ({packed['real_token_fraction']:.3f}, "
        f"padding {packed['padding_factor']:.2f}x; the padded system's first batch: "
        f"{fmt(packed['measured_real_token_fraction'], 3)}).\n"
    )
    L.append(
        f"| layout | s/step (median) | per-round medians | {mem_name} (MiB) | sequences | tokens in the batch tensors | "
        "completion tokens |"
    )
    L.append("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for key in ("padded", "packed"):
        row = packed[key]
        tokens = (row["batch"] or {}).get("completion_tokens", "n/a")
        L.append(_step_row(LABELS[row["system"]], row, f"{tokens} |"))
    p = packed["packed"]
    L.append("")
    L.append(
        f"- padding_free / padded step time: {fmt(p['ratio'], 3)} (per round {_ratios(p['spread'])}); "
        f"padded / padding_free: {fmt(packed['speedup'], 3)}; {mem_name} padding_free / padded: "
        f"{fmt(p['memory_ratio'], 3)}"
    )
    L.append(
        f"- padding_free step / (real-token fraction x padded step): {fmt(packed['packed_over_bound'], 3)} "
        f"(target <= {PACKED_SLACK:.2f}: the packed step costs what its real tokens cost)\n"
    )
    return L


def render_lists(lists: dict, mem_name: str) -> list[str]:
    k = lists["list_size"]
    L = ["## Listwise K = 4 against pairwise\n"]
    L.append(
        f"{lists['description']}. The same {lists['workload']['n_pairs']} prompts, {lists['workload']['batch_pairs']} "
        f"per step: as pairs (each list's best against its worst, objective pairwise) and as ranked lists of "
        f"K = {k} (one forward of K sequences per prompt), precomputed reference, interleaved by round.\n"
    )
    L.append(
        f"| system | s/step (median) | per-round medians | {mem_name} (MiB) | sequences | tokens in the batch tensors | "
        "/ pairwise (by round) | per-round ratios | memory / pairwise |"
    )
    L.append("| --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |")
    L.append(_step_row("pairwise, mallows phi", lists["pairwise"], "1.000 | | 1.000 |"))
    for row in lists["listwise"]:
        extra = f"{fmt(row['ratio'], 3)} | {_ratios(row['spread'])} | {fmt(row['memory_ratio'], 3)} |"
        L.append(_step_row(f"{row['objective']} K={k}, mallows {row['mallows']}", row, extra))
    L.append("")
    ref = lists["refpass"]
    if ref:
        responses = ref.get("responses") or {}
        L.append("### The reference pass per response\n")
        L.append(
            "`compute_list_reference_columns` over the lists against `compute_reference_columns` (with the "
            "entropy) over the same prompts' pairs, alternated (ABBA) in one process on the same model; each "
            "response is scored once, so the seconds per response sequence should be about equal.\n"
        )
        L.append("| pass | response sequences | s per pass (median) | s per response sequence |")
        L.append("| --- | ---: | ---: | ---: |")
        for kind, what in (("lists", f"lists, K = {k}"), ("pairs", "pairs")):
            L.append(
                f"| {what} | {responses.get(kind, 'n/a')} | {fmt(ref.get(f'{kind}_s'), 4)} | "
                f"{fmt(ref.get(f'{kind}_s_per_response'), 6)} |"
            )
        L.append(
            f"\nPer response, lists / pairs: {fmt(ref.get('ratio'), 3)} (per repeat {_ratios(ref.get('round_ratios', []))}); "
            f"the lists' best and worst log-probs equal the pairs': {ref.get('logps_match')}.\n"
        )
    return L


def render(figs: dict, mem_name: str) -> list[str]:
    L = []
    if figs.get("packed"):
        L += render_packed(figs["packed"], mem_name)
    if figs.get("lists"):
        L += render_lists(figs["lists"], mem_name)
    return L
