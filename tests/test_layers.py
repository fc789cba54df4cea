"""The layers of docs/design.md, enforced: the math imports only numpy, scipy, torch and
itself; training/ never imports cli/ or experiments/; only cli/ imports experiments/;
importing the math loads no training library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mallowspo"
MATH_MODULES = (
    "mallows",
    "links",
    "losses",
    "listwise",
    "objective",
    "dispersion",
    "annotators",
    "annotator_prior",
    "annotator_rankings",
    "annotator_columns",
)
MATH_THIRD_PARTY = {"numpy", "scipy", "torch"}


def imported_modules(path: Path, package: str | None = None) -> set[str]:
    """Every module ``path`` imports: absolute names, relative imports resolved in ``package``
    (default: the package the file is in)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = package or ".".join(("mallowspo", *path.relative_to(PACKAGE).parent.parts))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
    return names


def modules_under(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def layer_of(module: str) -> str | None:
    """'math', 'training', 'cli', 'experiments' or 'testing' for a mallowspo module; None otherwise."""
    parts = module.split(".")
    if parts[0] != "mallowspo" or len(parts) == 1:
        return None
    return "math" if parts[1] in MATH_MODULES else parts[1]


@pytest.mark.parametrize("name", MATH_MODULES)
def test_the_math_imports_only_numpy_scipy_torch_and_itself(name):
    for module in imported_modules(PACKAGE / f"{name}.py"):
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top in MATH_THIRD_PARTY or top == "__future__":
            continue
        assert layer_of(module) == "math", f"mallowspo/{name}.py imports {module}"


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        ("training", {"cli", "experiments", "testing"}),
        ("testing", {"training", "cli", "experiments"}),
        ("experiments", {"cli"}),
    ],
)
def test_layers_import_only_the_layers_below(folder, forbidden):
    files = modules_under(folder)
    assert files
    for path in files:
        for module in imported_modules(path):
            assert layer_of(module) not in forbidden, f"{path.relative_to(PACKAGE)} imports {module}"


def test_only_the_cli_imports_the_experiments():
    outside = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in ("cli", "experiments")]
    for path in outside:
        for module in imported_modules(path):
            assert layer_of(module) != "experiments", f"{path.relative_to(PACKAGE)} imports {module}"


def test_the_scan_sees_a_forbidden_import(tmp_path):
    """The AST scan itself: it finds absolute and relative imports of another layer."""
    probe = tmp_path / "probe.py"
    probe.write_text("import mallowspo.cli\nfrom ..experiments import world\nfrom . import scoring\n")
    found = imported_modules(probe, package="mallowspo.training")
    assert {"mallowspo.cli", "mallowspo.experiments", "mallowspo.training"} <= found
    assert layer_of("mallowspo.experiments") == "experiments" and layer_of("mallowspo.losses") == "math"


def test_importing_the_math_loads_no_training_library():
    code = (
        "import sys, mallowspo, mallowspo.losses, mallowspo.dispersion, mallowspo.mallows, mallowspo.links\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'trl', 'datasets', 'accelerate'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
