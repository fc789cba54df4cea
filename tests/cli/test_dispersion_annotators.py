"""`mallowspo dispersion` on annotated data: the agreement histogram, the annotator and entropy
estimates side by side and their Spearman correlation, on stdout and in report.md, summary.json
and annotators.jsonl; a dataset in MultiPref's layout; and bad columns as one-line errors."""

from __future__ import annotations

import json

import pytest

VOTES = [[1, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 1], [0, 1, 1], [1, 1, None]]  # 3 of 3 twice, 2 of 3 (and 2 of 2)


@pytest.fixture
def annotated_path(tmp_path, tiny_prefs_path):
    """The first 24 rows of the tiny preference file, each with three annotators' votes."""
    rows = [json.loads(line) for line in tiny_prefs_path.read_text().splitlines() if line.strip()][:24]
    path = tmp_path / "annotated.jsonl"
    path.write_text("".join(json.dumps({**row, "votes": VOTES[i % len(VOTES)]}) + "\n" for i, row in enumerate(rows)))
    return path


def test_the_report_compares_the_annotators_with_the_entropy(make_recipe, annotated_path, tmp_path, run_cli):
    recipe = make_recipe(
        dataset_name=str(annotated_path),
        dispersion_source="annotators",
        dispersion_votes_column="votes",
        per_device_train_batch_size=8,
    )
    out = tmp_path / "report"
    code, stdout, _ = run_cli("dispersion", "--config", recipe, "--out", out)
    assert code == 0
    lines = stdout.splitlines()
    assert "Annotations: dispersion_votes_column 'votes', consensus majority; Beta prior a = " in stdout
    header = next(i for i, line in enumerate(lines) if line.startswith("votes with the consensus"))
    assert lines[header].split("  ")[-1].strip() == "-log phi, entropy"
    assert [line.split()[:4] for line in lines[header + 1 : header + 4]] == [
        ["3", "of", "3", "8"],
        ["2", "of", "3", "12"],
        ["2", "of", "2", "4"],
    ]
    assert any(line.startswith("annotators ") for line in lines) and any(line.startswith("entropy ") for line in lines)
    assert "Spearman correlation of the annotator and entropy estimates over 24 pairs: " in stdout

    report = (out / "report.md").read_text()
    assert "## Annotators against the entropy proxy" in report
    assert "| votes with the consensus | pairs | -log phi, annotators | -log phi, entropy |" in report
    assert "| 3 of 3 | 8 |" in report and "Spearman correlation" in report
    summary = json.loads((out / "summary.json").read_text())
    comparison = summary["annotators"]
    assert [(h["agree"], h["total"], h["pairs"]) for h in comparison["histogram"]] == [
        (3, 3, 8),
        (2, 3, 12),
        (2, 2, 4),
    ]
    assert summary["source"] == "annotators" and len(summary["prior"]) == 2 and "rows" not in comparison
    assert comparison["summary"]["annotators"]["mean"] == pytest.approx(1.0)
    assert comparison["summary"]["entropy"]["mean"] == pytest.approx(1.0)  # the same normalisation, mean 1
    rows = [json.loads(line) for line in (out / "annotators.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and rows[1]["agree"] == 2 and rows[1]["total"] == 3
    unanimous, split = rows[0]["neg_log_phi"], rows[1]["neg_log_phi"]
    assert unanimous > split


def test_a_multipref_file_loads_as_it_is(make_recipe, tmp_path, run_cli):
    label = lambda side: {"evaluator": "w", "overall_pref": f"{side}-is-clearly-better", "time_spent": 10}
    rows = []
    for i, (a, b) in enumerate(
        [("The sky is blue.", "The sky is green."), ("Seven is a prime.", "Nine is a prime.")] * 6
    ):
        votes = ["A", "A", "A", "B"] if i % 3 else ["A", "A", "A", "A"]
        rows.append(
            {
                "comparison_id": str(i),
                "text": "Say something true.",
                "completion_a": a,
                "completion_b": b,
                "normal_worker_annotations": [label(v) for v in votes[:2]],
                "expert_worker_annotations": [label(v) for v in votes[2:]],
            }
        )
    path = tmp_path / "multipref.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = make_recipe(dataset_name=str(path), dispersion_source="annotators", dispersion_format="multipref")
    code, stdout, _ = run_cli("dispersion", "--config", recipe, "--out", tmp_path / "out")
    assert code == 0
    assert "dispersion_format 'multipref' (column 'annotator_votes')" in stdout
    assert "4 of 4" in stdout and "3 of 4" in stdout


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--dispersion_votes_column", "stars"], "missing_columns (no column 'stars'"),
        (
            ["--dispersion_chosen_votes_column", "votes"],
            "error: dispersion_chosen_votes_column and dispersion_rejected",
        ),
        (["--dispersion_consensus", "all"], "error: dispersion_consensus must be one of ('majority', 'given')"),
    ],
)
def test_bad_annotator_settings_are_one_line_errors(
    make_recipe, annotated_path, tmp_path, run_cli, overrides, message
):
    recipe = make_recipe(dataset_name=str(annotated_path), dispersion_source="annotators")
    code, _, stderr = run_cli("dispersion", "--config", recipe, "--out", tmp_path / "out", *overrides)
    assert code == 2 and message in stderr
    assert len([line for line in stderr.splitlines() if line.startswith("error:")]) == 1
