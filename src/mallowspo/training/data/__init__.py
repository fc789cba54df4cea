"""Preference data, before any model work: ``load`` (files, directories, hub ids),
``validate`` (problem kinds, the report, raw-row checks), ``tools`` (TRL's tools and
chat_template_kwargs columns), ``tokenize`` (templates, tokens, budgets, truncation_mode) and
``prepare`` (the pipeline, ``prepare_preference_dataset``); ``annotations`` maps the raw layouts of
annotated datasets (``dispersion_format``: MultiPref, HelpSteer2-Preference) to pairs and votes."""

from mallowspo.training.data.load import load_preference_dataset, looks_like_path
from mallowspo.training.data.prepare import (
    TOKEN_COLUMNS,
    TRUNCATION_MODES,
    PreferenceDataConfig,
    check_tokenized_dataset,
    prepare_preference_dataset,
)
from mallowspo.training.data.validate import NOTE_KINDS, PROBLEM_KINDS, DataValidationError, ValidationReport

__all__ = [
    "NOTE_KINDS",
    "PROBLEM_KINDS",
    "TOKEN_COLUMNS",
    "TRUNCATION_MODES",
    "DataValidationError",
    "PreferenceDataConfig",
    "ValidationReport",
    "check_tokenized_dataset",
    "load_preference_dataset",
    "looks_like_path",
    "prepare_preference_dataset",
]
