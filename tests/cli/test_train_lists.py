"""`mallowspo train` on ranked lists: a recipe with objective plackett_luce trains on a lists file
and logs the ranking accuracy; a bad list is one line naming the row (exit 2)."""

from __future__ import annotations

import json

import torch

torch.set_num_threads(1)


def write_lists(path, tiny_prefs_path, bad_row=None):
    """Lists of 2 or 3 responses from the tiny pairs (the third another row's chosen, ranked last)."""
    rows = [json.loads(line) for line in tiny_prefs_path.read_text().splitlines()[:24]]
    lists = []
    for i, row in enumerate(rows):
        responses = [row["chosen"], row["rejected"]]
        other = rows[(i + 5) % len(rows)]["chosen"]
        if i % 2 and other not in responses:
            responses.append(other)
        lists.append({"prompt": row["prompt"], "responses": responses, "ranking": list(range(len(responses)))})
    if bad_row is not None:
        lists[bad_row]["ranking"] = [0, 0, 1][: len(lists[bad_row]["responses"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in lists))
    return path


def test_a_listwise_recipe_trains_and_logs_the_ranking_accuracy(run_cli, make_recipe, tiny_prefs_path, tmp_path):
    data = write_lists(tmp_path / "lists.jsonl", tiny_prefs_path)
    recipe = make_recipe(dataset_name=str(data), objective="plackett_luce", mallows="theta", max_steps=2)
    code, out, err = run_cli("train", "--config", recipe)
    assert code == 0, err
    assert "rewards/kendall_tau" in out + err


def test_a_bad_list_is_a_one_line_error(run_cli, make_recipe, tiny_prefs_path, tmp_path):
    data = write_lists(tmp_path / "lists.jsonl", tiny_prefs_path, bad_row=3)
    recipe = make_recipe(dataset_name=str(data), objective="all_pairs")
    code, _, err = run_cli("train", "--config", recipe)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1
    assert "bad_ranking (1 row; e.g. row 3: the ranking [0, 0, 1] is not a permutation" in lines[0]


def test_the_dispersion_report_reads_lists_as_the_run_does(run_cli, make_recipe, tiny_prefs_path, tmp_path):
    """Under a listwise objective the report's Hbar is over each list's K responses (eq. 11 over K,
    from the per-response entropies it writes); under pairwise the lists are binarized first."""
    import numpy as np

    data = write_lists(tmp_path / "lists.jsonl", tiny_prefs_path)
    for objective, rows_are in (("all_pairs", "lists"), ("pairwise", "pairs")):
        out = tmp_path / f"dispersion-{objective}"
        recipe = make_recipe(dataset_name=str(data), objective=objective)
        code, stdout, err = run_cli("dispersion", "--config", recipe, "--out", str(out))
        assert code == 0, err
        assert f"24 {rows_are}: -log phi mean" in stdout
        records = [json.loads(line) for line in (out / "dispersion.jsonl").read_text().splitlines()]
        assert len(records) == 24
        if objective == "all_pairs":
            sizes = [len(r["ref_entropy"]) for r in records]
            assert set(sizes) == {2, 3}
            # Hbar = mean over the K responses of H_k, over log V: the same log V for every row
            log_v = [np.mean(r["ref_entropy"]) / r["hbar"] for r in records]
            assert np.allclose(log_v, log_v[0], rtol=1e-6)
        else:
            assert "ref_chosen_entropy" in records[0] and "ref_entropy" not in records[0]
        assert f"| -log phi | Hbar | {rows_are} | prompt |" in (out / "report.md").read_text()
