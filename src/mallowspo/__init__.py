"""mallowspo: preference optimisation with a per-prompt dispersion index (MallowsPO, arXiv 2405.14953).

Layers (see docs/design.md), each importing only those above it:
  math         mallows, links, losses, dispersion   the paper: plain numpy/scipy/torch, no I/O
  training/    config, data/, head, scoring, reference, trainer, ...   needs transformers/trl/datasets
  experiments/ bandit, estimator_check, controllable/, world/          reproductions
  cli/         the `mallowspo` command                                 imports all of the above
  testing/     tiny models and data shared by the tests, benchmarks and the world

``MallowsPOConfig`` and ``MallowsPOTrainer`` are importable from the package root; they
are loaded on first use, so the math layer never pays for importing transformers.
"""

__version__ = "0.1.0"

_LAZY = {"MallowsPOConfig": "mallowspo.training.config", "MallowsPOTrainer": "mallowspo.training.trainer"}
__all__ = ["MallowsPOConfig", "MallowsPOTrainer", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mallowspo' has no attribute {name!r}")
