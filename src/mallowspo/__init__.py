"""mallowspo: preference optimisation with a per-prompt dispersion index (MallowsPO, arXiv 2405.14953).

Layers (see docs/design.md):
  math      mallows, links, losses, dispersion        (plain torch/numpy, no I/O)
  training  data, reference, trainer, config          (imports math)
  entry     cli, commands/*, experiments, world       (imports both)

``MallowsPOConfig`` and ``MallowsPOTrainer`` are importable from the package root; they
are loaded on first use, so the math layer never pays for importing transformers.
"""

__version__ = "0.1.0"

_LAZY = {"MallowsPOConfig": "mallowspo.config", "MallowsPOTrainer": "mallowspo.trainer"}
__all__ = ["MallowsPOConfig", "MallowsPOTrainer", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mallowspo' has no attribute {name!r}")
