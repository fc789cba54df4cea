"""Preference data, before any model work: ``load`` (files, directories, hub ids),
``validate`` (problem kinds, the report, raw-row checks), ``tools`` (TRL's tools and
chat_template_kwargs columns), ``tokenize`` (templates, tokens, budgets, truncation_mode) and
``prepare`` (the pipeline, ``prepare_preference_dataset``); ``annotations`` maps the raw layouts of
annotated datasets (``dispersion_format``: MultiPref, HelpSteer2-Preference) to pairs and votes.
Ranked lists: ``list_formats`` (layouts, ``ListDataConfig``), ``list_validate`` (row checks),
``lists`` (``prepare_list_dataset``) and ``binarize`` (pairs or lists for the objective:
``prepare_training_data``, the one loader of a run)."""

from mallowspo.training.data.binarize import prepare_training_data
from mallowspo.training.data.list_formats import ListDataConfig
from mallowspo.training.data.lists import prepare_list_dataset
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
    "ListDataConfig",
    "PreferenceDataConfig",
    "ValidationReport",
    "check_tokenized_dataset",
    "load_preference_dataset",
    "looks_like_path",
    "prepare_list_dataset",
    "prepare_preference_dataset",
    "prepare_training_data",
]
