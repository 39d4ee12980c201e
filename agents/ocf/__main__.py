"""python -m precopy_agents.ocf: precopy-ocf."""

import sys

from . import main

sys.exit(main())
