"""The built-in world: a small film-review language world in which every quantity the
paper talks about is known (see docs/world.md).

- a base ("SFT") model and tokenizer trained by the project on a corpus it generates
  (``build.py``, ``corpus.py``, ``lm.py``);
- closed prompts (annotators agree, phi(x) small) and open prompts (phi(x) near 1);
- a ground-truth reward r*(x, y), the VADER sentiment of the response (``reward.py``);
- annotators whose rankings follow a Kendall Mallows model (``annotators.py``), and
  preference pairs made from them in TRL's standard format, and the ranked lists with
  every annotator's ranking beside them (``data.py``).

``ensure_world()`` returns the paths of a complete world, building it on first use.
"""

from mallowspo.experiments.world.ensure import ensure_world
from mallowspo.experiments.world.paths import WorldPaths, locate_world, user_world_dir

__all__ = ["WorldPaths", "ensure_world", "locate_world", "user_world_dir"]
