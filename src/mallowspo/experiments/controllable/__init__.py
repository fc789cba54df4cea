"""Controllable generation in the built-in world (paper §5.3, Fig. 8c) at CPU scale:
DPO against MallowsPO-theta and MallowsPO-phi, trained from the same base model on the
same preference pairs with the same budget, and judged by the ground-truth reward.

The paper fine-tunes GPT-2-large (SFT on IMDB) on offline preference pairs and plots the
sentiment classifier's reward of sampled generations against KL(pi || pi_ref) during
training. Its claim: MallowsPO-theta ~ DPO; MallowsPO-phi reaches the same reward at a
lower KL. Here the world of ``mallowspo.experiments.world`` stands in for IMDB: a base ("SFT") model,
closed prompts (annotators agree, phi(x) small) and open prompts (phi(x) near 1), the
VADER sentiment r*(x, y) as the reward, and pairs drawn from Kendall Mallows annotators.

One pipeline (``run_controllable``), used both by ``mallowspo demo`` (one seed, one beta,
the mix of families: ``mallowspo.cli.demo.demo_config()``) and ``mallowspo experiment
controllable`` (several seeds and betas, one family or the mix), configured by a
``ControllableConfig`` (config.py):

1. Dispersion (run.py, ``WorldRunner.dispersion``). A ``MallowsPOTrainer`` with the
   library defaults is built on the whole world train set (the mix): its reference pass
   gives the entropy estimate of -log phi(x) per pair (eqs. 10-11, phi* = train mean 1),
   compared with the true phi(x) (stats.py, ``dispersion_vs_truth``; Fig. 3) and
   histogrammed by family (Fig. 7). Runs restricted to one family keep this phi* (a fixed
   ``dispersion_normalization``), so a closed prompt has the same -log phi estimate in
   every run; the mix runs use the default ``mean`` normalisation, which gives the same phi*.
2. Training (run.py, ``WorldRunner.train_one``). For each seed, beta and method,
   ``MallowsPOTrainer`` (in-process) trains a fresh copy of the base model on the train
   pairs of the family; a ``TrainerCallback`` evaluates the policy at step 0 and at evenly
   spaced steps (evaluate.py, ``CheckpointEvaluator``).
3. Evaluation on held-out prompts (the world's test titles), per checkpoint (evaluate.py,
   ``evaluate_policy``):
   - reward: mean r*(x, y) of ``samples_per_prompt`` samples y ~ pi(.|x) per prompt
     (ancestral sampling at temperature 1, no top-k/top-p);
   - KL: mean over the same samples of log pi(y|x) - log pi_ref(y|x), on the exact sampled
     token ids (prompt excluded, end token included): an unbiased estimate of the
     sequence-level KL(pi || pi_ref);
   - preference accuracy: share of held-out pairs whose implicit reward margin
     beta [(log pi - log pi_ref)(yw) - (log pi - log pi_ref)(yl)] is > 0;
   each for all prompts and per family (closed/open). Samples that do not end within
   ``max_new_tokens`` are not responses; they are counted (``unfinished``) and left out.
   All methods use the same sampling seed at each checkpoint (common random numbers).
4. Outputs (report.py, ``write_outputs``): results.json, report.md with the table and a
   verdict, and the figures reward_kl.png (Fig. 8c), reward_kl_by_family.png,
   dispersion_vs_truth.png (Fig. 3 for the LM) and dispersion_hist.png (Fig. 7).

Statistics (stats.py): over several seeds every number is the mean over seeds with a 95%
t-interval (``mean_ci``). The main comparison at equal KL: for each seed, each method's
reward is interpolated on its own training curve at the KL where the *least* travelled
method ends (``matched_kl``), and the difference to DPO is taken per seed (paired).
"""

from mallowspo.experiments.controllable.config import FAMILY_CHOICES, METHODS, ControllableConfig
from mallowspo.experiments.controllable.report import load_results, verdict_lines, write_outputs
from mallowspo.experiments.controllable.run import run_controllable

__all__ = [
    "FAMILY_CHOICES",
    "METHODS",
    "ControllableConfig",
    "load_results",
    "run_controllable",
    "verdict_lines",
    "write_outputs",
]
