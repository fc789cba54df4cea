"""Write a pip constraints file that pins every dependency of pyproject.toml at its declared floor.

Each requirement of ``[project].dependencies`` and of every ``[project.optional-dependencies]``
extra must declare a floor, ``name>=X`` (an upper bound may follow); it becomes ``name==X``. A
requirement without a floor is an error: every dependency has a minimum, and ``make test-min``
tests it. ``--dev-pin NAME`` takes NAME's exact pin from requirements-dev.txt instead of its
floor (``make test-min`` does so for torch: see the Makefile).

Usage: python scripts/min_constraints.py [--dev-pin NAME ...] [--out PATH]
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$")
FLOOR = re.compile(r"^>=\s*([0-9][0-9A-Za-z.+!-]*)$")
PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)")


def canonical(name: str) -> str:
    """The name as pip compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def floors(pyproject: Path) -> dict[str, tuple[str, str]]:
    """canonical name -> (name as declared, floor) for every requirement of the project and its extras."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    found: dict[str, tuple[str, str]] = {}
    for requirement in requirements:
        match = REQUIREMENT.match(requirement)
        if match is None:
            raise SystemExit(f"cannot parse the requirement {requirement!r} in {pyproject}")
        name, specifiers = match.group(1), match.group(3)
        lows = [m.group(1) for s in specifiers.split(",") if (m := FLOOR.match(s.strip()))]
        if len(lows) != 1:
            raise SystemExit(f"{requirement!r} in {pyproject} needs exactly one floor (name>=X)")
        key = canonical(name)
        if key in found and found[key][1] != lows[0]:
            raise SystemExit(f"{name} has two floors in {pyproject}: {found[key][1]} and {lows[0]}")
        found[key] = (name, lows[0])
    return found


def dev_pins(requirements: Path) -> dict[str, str]:
    """canonical name -> exact version pinned in requirements-dev.txt."""
    pins = {}
    for line in requirements.read_text().splitlines():
        if match := PIN.match(line):
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("--requirements", type=Path, default=ROOT / "requirements-dev.txt")
    parser.add_argument("--dev-pin", action="append", default=[], metavar="NAME", help="pin NAME as in --requirements")
    parser.add_argument("--out", type=Path, help="file to write (default: stdout)")
    args = parser.parse_args(argv)

    pins = floors(args.pyproject)
    lines = [f"# Written by scripts/min_constraints.py from {args.pyproject.name}: every dependency at its floor."]
    dev = dev_pins(args.requirements) if args.dev_pin else {}
    for name in args.dev_pin:
        key = canonical(name)
        if key not in pins:
            raise SystemExit(f"--dev-pin {name}: not a dependency in {args.pyproject}")
        if key not in dev:
            raise SystemExit(f"--dev-pin {name}: no {name}==X in {args.requirements}")
        declared, floor = pins[key]
        pins[key] = (declared, dev[key])
        lines.append(f"# {declared}: the {args.requirements.name} pin {dev[key]}, not the floor {floor}.")
    lines += [f"{name}=={version}" for name, version in pins.values()]
    text = "\n".join(lines) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
