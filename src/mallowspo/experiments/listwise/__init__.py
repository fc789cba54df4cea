"""Does training on whole rankings help? The listwise experiment in the built-in world
(docs/listwise.md, "Experiment").

Five arms (``ARMS``) train from the world's base model on the same train lists (the prompts of the
controllable experiment, read through the trainer's list loader), with the same batches of prompts,
optimizer steps and learning rate:

- DPO best-vs-worst: each list's best and worst response (``binarize: best_worst``: the world's pairs);
- DPO all pairs: ``objective: all_pairs``, ``mallows: none``;
- Plackett-Luce: ``objective: plackett_luce``;
- MallowsPO-theta + Plackett-Luce;
- MallowsPO-phi on all pairs (library defaults: cubic smoothing, eps 0.1).

The MallowsPO arms take -log phi(x) from the reference model's entropy over each list's K responses
(eq. 11 over K), normalised to mean 1 over the world's train lists. Evaluation is the controllable
experiment's (reward and KL of samples on held-out prompts, accuracy on held-out pairs), plus
Kendall's tau on held-out lists between the implicit rewards and the observed ranking (and the true
rewards' order); the comparison at equal KL takes per seed the smallest final KL of the arms.

``run_listwise`` (run.py) computes; report.py writes results.json, listwise.png and report.md.
"""

from mallowspo.experiments.listwise.report import load_results, verdict_lines, write_outputs
from mallowspo.experiments.listwise.run import ARMS, ListwiseConfig, kendall_tau, run_listwise

__all__ = ["ARMS", "ListwiseConfig", "kendall_tau", "load_results", "run_listwise", "verdict_lines", "write_outputs"]
