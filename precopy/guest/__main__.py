"""Run the demo guest as ``python -m precopy.guest ...``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
