"""Experiment 1 of "dispersion measured, not guessed": how well M annotators estimate -log phi(x),
against the truth and against the entropy proxy (docs/dispersion_sources.md, "Experiment 1").

For each M (default 1, 2, 3, 5, 10) the annotator estimates of ``mallowspo.dispersion``, on pairs
(votes on annotator 1's top vs bottom) and on lists (rankings), are scored by their Spearman
correlation with the true -log phi and by their calibration (mean estimate per bin of the truth),
overall and within each prompt family, next to the entropy estimate -phi* log Hbar (eq. 10):

- on the built-in world (data.py, ``load_world``): its prompts' true phi comes from four templates,
  its lists carry M = 5 annotators (the first M are used; more are drawn from the Kendall model at
  the true phi), and its pairs carry the reference model's entropies;
- on a pure Kendall Mallows simulation with a continuous truth (``simulate``), as in Fig. 3.

``run_annotators`` (run.py) computes; evaluate.py holds the estimates and scores; report.py
writes results.json, annotators.png and report.md.
"""

from mallowspo.experiments.annotators.report import verdict_lines, write_outputs
from mallowspo.experiments.annotators.run import AnnotatorsConfig, run_annotators

__all__ = ["AnnotatorsConfig", "run_annotators", "verdict_lines", "write_outputs"]
