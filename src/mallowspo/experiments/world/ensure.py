"""A complete world on disk: find it, or build it on first use."""

from __future__ import annotations

from pathlib import Path

from mallowspo.experiments.world.build import WorldConfig, build_world_model
from mallowspo.experiments.world.data import WorldDataConfig, generate_preference_data
from mallowspo.experiments.world.paths import WorldPaths, locate_world


def ensure_world(root: str | Path | None = None, log=print) -> WorldPaths:
    """A complete world (model + data).

    With ``root``, the world must already be complete there: a directory the user names is
    never filled by a silent multi-minute build (``mallowspo world build --out`` does that).
    Without it, ``locate_world()`` picks the world; only when neither the user directory nor
    the shipped assets hold one is it built in the user directory (a few minutes, once)."""
    if root is not None:
        paths = WorldPaths(Path(root))
        if not paths.is_complete():
            raise FileNotFoundError(
                f"no complete world at {root} (model/, world.json and data/ expected); build one with "
                f"`mallowspo world build --out {root}`, or leave the world out to use the built-in one"
            )
        return paths
    paths = locate_world()
    if not paths.has_model():
        log(f"building the built-in world's base model in {paths.root} (a few minutes, once)")
        build_world_model(paths.root, WorldConfig(), log=log)
    if not paths.has_data():
        log(f"generating the built-in world's preference data in {paths.data_dir}")
        generate_preference_data(paths.root, WorldDataConfig(), log=log)
    return paths
