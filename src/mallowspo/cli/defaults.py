"""The built-in default run: what `mallowspo train` (and `mallowspo dispersion`) run with no
arguments.

``default_run_config()``: MallowsPO-phi (library defaults) on the built-in world
(``mallowspo.experiments.world``): its base model, its train pairs, evaluated at the end on
its held-out pairs. The world is shipped with the package or built on first use
(``ensure_world``). One epoch; about a minute on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from mallowspo.experiments.world import ensure_world

# The world's model gains nothing from intra-op threads, and on a shared CPU they cost up to
# 10x (threads spin waiting for each other): the built-in run uses one.
BUILTIN_THREADS = 1
# The world's default learning rate (AdamW): the largest at which the policies of
# `mallowspo demo` stay fluent over its budget (see docs/controllable.md).
WORLD_LEARNING_RATE = 3e-5


def default_run_config() -> dict[str, Any]:
    """The settings of `mallowspo train` without --config (command-line overrides still apply):
    MallowsPO-phi on the built-in world, evaluated on its held-out pairs.

    Also limits torch to ``BUILTIN_THREADS`` threads, the right setting for the world's
    small model."""
    torch.set_num_threads(BUILTIN_THREADS)
    world = ensure_world()
    return {
        "model_name_or_path": str(world.model_dir),
        "dataset_name": str(world.data_dir),  # train.jsonl and test.jsonl: the splits "train" and "test"
        "dataset_train_split": "train",
        "dataset_test_split": "test",
        "output_dir": "runs/mallowspo-world",
        "mallows": "phi",
        "beta": 0.1,
        "learning_rate": WORLD_LEARNING_RATE,
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": 10,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 64,
        "max_length": 128,
        "max_prompt_length": 32,
        "logging_steps": 10,
        "save_strategy": "no",
        "seed": 0,
        "dataloader_pin_memory": False,
        "report_to": "tensorboard" if importlib.util.find_spec("tensorboard") else "none",
    }
