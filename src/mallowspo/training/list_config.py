"""The listwise keys of a run: what the objective trains on (pairs or ranked lists of K responses)
and how list data is read. ``ListwiseKeys`` is a mixin of ``MallowsPOConfig``; ``check_listwise_settings``
is their one validator.

    objective       pairwise (default: today's pairs, TRL's DPO objectives), or a listwise objective of
                    ``mallowspo.listwise.listwise_loss`` with the run's loss_type, beta, mallows and
                    dispersion: plackett_luce (the ranking's likelihood; loss_type sigmoid with mallows
                    none or theta) or all_pairs (the mean of the pairwise loss over the list's ordered pairs,
                    any loss_type and mallows). With K = 2 both are the pairwise loss. A listwise objective
                    trains on one preference term (no sft, no loss_weights).
    listwise_top_k  plackett_luce: the first k stages of the ranking only (default: all)
    binarize        objective pairwise on list data: best_worst, best_random or all_pairs_as_rows
                    (``training.data.binarize``)
    max_responses   the most responses a list keeps (default: all)
    list_format, responses_column, ranking_column, scores_column, ultrafeedback_score
                    the layout of list data (``training.data.list_formats``)

``per_device_train_batch_size`` counts prompts: a batch of B lists is one forward of their
sum-of-K sequences, at most B * max_responses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mallowspo.listwise import OBJECTIVES, check_listwise_options
from mallowspo.training.data.list_formats import (
    BINARIZE_RULES,
    LIST_FORMATS,
    ULTRAFEEDBACK_SCORES,
    ListDataConfig,
)

logger = logging.getLogger(__name__)

TRAINING_OBJECTIVES = ("pairwise", *OBJECTIVES)


@dataclass
class ListwiseKeys:
    """The listwise keys of ``MallowsPOConfig`` (module docstring)."""

    objective: str = field(
        default="pairwise",
        metadata={
            "help": f"What the loss is over, one of {TRAINING_OBJECTIVES}: pairwise (pairs; lists are binarized), "
            "plackett_luce (the likelihood of each ranked list; sigmoid with mallows none or theta) or all_pairs "
            "(the mean loss over each list's ordered pairs, any loss_type). Pairs are lists of K = 2."
        },
    )
    listwise_top_k: int | None = field(
        default=None,
        metadata={"help": "plackett_luce: keep the first k stages of each ranking (the top k choices); null: all."},
    )
    binarize: str = field(
        default="best_worst",
        metadata={
            "help": f"objective pairwise on list data: pairs from each list, one of {BINARIZE_RULES} (best_random: "
            "the best against a seeded random worse response)."
        },
    )
    max_responses: int | None = field(
        default=None,
        metadata={
            "help": "The most responses a list keeps (>= 2): its best, its worst and a seeded random choice of the "
            "others; bounds a batch at per_device_train_batch_size * max_responses sequences. null: all."
        },
    )
    list_format: str = field(
        default="auto",
        metadata={
            "help": f"Layout of the data, one of {LIST_FORMATS}: responses (prompt, responses, ranking or scores), "
            "ultrafeedback (openbmb/UltraFeedback), armorm (princeton-nlp/llama3-ultrafeedback-armorm), pairs "
            "(TRL's chosen/rejected); auto: by the columns."
        },
    )
    responses_column: str = field(
        default="responses", metadata={"help": "list_format responses: the column of the K responses."}
    )
    ranking_column: str | None = field(
        default="ranking",
        metadata={
            "help": "list_format responses: the column of response indices, best first (used over the scores when "
            "both are there; null to rank by the scores)."
        },
    )
    scores_column: str | None = field(
        default="scores",
        metadata={"help": "list_format responses: the column of one score per response, higher is better; ties tie."},
    )
    ultrafeedback_score: str = field(
        default="overall_score",
        metadata={
            "help": f"list_format ultrafeedback: the score that ranks the completions, one of {ULTRAFEEDBACK_SCORES} "
            "(an aspect: its Rating)."
        },
    )

    def to_list_config(self) -> ListDataConfig:
        """The ``training.data.ListDataConfig`` these arguments describe (which validates the data keys)."""
        return ListDataConfig(
            list_format=self.list_format,
            responses_column=self.responses_column,
            ranking_column=self.ranking_column,
            scores_column=self.scores_column,
            ultrafeedback_score=self.ultrafeedback_score,
            max_responses=self.max_responses,
            as_lists=self.objective != "pairwise",
            binarize=self.binarize,
            seed=getattr(self, "seed", 0),
        )


def check_listwise_settings(args) -> None:
    """Raise a one-line ValueError for listwise keys that cannot train; warn for those the objective ignores."""
    if args.objective not in TRAINING_OBJECTIVES:
        raise ValueError(
            f"objective must be one of {', '.join(map(repr, TRAINING_OBJECTIVES))}, got {args.objective!r}"
        )
    top_k = args.listwise_top_k
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"listwise_top_k must be an integer >= 1 or null, got {top_k!r}")
    args.to_list_config()
    if args.objective == "pairwise":
        if top_k is not None:
            logger.warning("listwise_top_k=%r is ignored: it applies to objective='plackett_luce'", top_k)
        return
    if len(args.loss_type) != 1 or args.loss_type[0] == "sft" or args.loss_weights is not None:
        raise ValueError(
            f"objective={args.objective!r} trains on one preference term, got loss_type={args.loss_type!r}"
            + (f" with loss_weights={args.loss_weights!r}" if args.loss_weights is not None else "")
            + "; give one loss_type (e.g. sigmoid) and no loss_weights, or use objective='pairwise'"
        )
    if args.objective != "plackett_luce" and top_k is not None:
        logger.warning("listwise_top_k=%r is ignored: it applies to objective='plackett_luce'", top_k)
        top_k = None
    check_listwise_options(args.objective, args.loss_type[0], args.mallows, args.label_smoothing, top_k)
    if args.binarize != "best_worst":
        logger.warning(
            "binarize=%r is ignored: it turns lists into pairs for objective='pairwise', and objective=%r trains on "
            "the lists",
            args.binarize,
            args.objective,
        )
