"""mallowspo: preference optimisation with a per-prompt dispersion index (MallowsPO, arXiv 2405.14953).

Layers (see docs/design.md):
  math      mallows, links, losses, dispersion        (plain torch/numpy, no I/O)
  training  data, reference, trainer, config          (imports math)
  entry     cli, commands/*, experiments              (imports both)
"""

__version__ = "0.1.0"
