"""Preference data, before any model work: ``load`` (files, directories, hub ids),
``validate`` (problem kinds, the report, raw-row checks), ``tokenize`` (templates, tokens,
budgets) and ``prepare`` (the pipeline, ``prepare_preference_dataset``)."""

from mallowspo.training.data.load import load_preference_dataset, looks_like_path
from mallowspo.training.data.prepare import (
    TOKEN_COLUMNS,
    PreferenceDataConfig,
    check_tokenized_dataset,
    prepare_preference_dataset,
)
from mallowspo.training.data.validate import PROBLEM_KINDS, DataValidationError, ValidationReport

__all__ = [
    "PROBLEM_KINDS",
    "TOKEN_COLUMNS",
    "DataValidationError",
    "PreferenceDataConfig",
    "ValidationReport",
    "check_tokenized_dataset",
    "load_preference_dataset",
    "looks_like_path",
    "prepare_preference_dataset",
]
