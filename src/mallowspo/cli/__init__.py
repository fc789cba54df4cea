"""The `mallowspo` command: one module per subcommand, the error contract (``errors``), the
built-in default run (``defaults``), and the shipped recipes and accelerate configs."""

from mallowspo.cli.main import main

__all__ = ["main"]
