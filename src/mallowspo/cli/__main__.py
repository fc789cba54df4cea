"""``python -m mallowspo.cli``: the `mallowspo` command (how `accelerate launch` re-runs it)."""

import sys

from mallowspo.cli.main import main

sys.exit(main())
