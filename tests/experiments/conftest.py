"""The experiments' shared fixture: a miniature built-in world (seconds to build)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def mini_world(tmp_path_factory):
    """The root of a miniature world (model and data), built once per test module."""
    from mallowspo.experiments.world.build import WorldConfig, build_world_model
    from mallowspo.experiments.world.data import WorldDataConfig, generate_preference_data

    root = tmp_path_factory.mktemp("world")
    build_world_model(root, WorldConfig.mini(), log=lambda *_: None)
    generate_preference_data(root, WorldDataConfig(), log=lambda *_: None)
    return root
