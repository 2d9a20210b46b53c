"""`python runner/run.py ...` lands here; see edgeq_targets.common.cli."""

import sys

from edgeq_targets.common.cli import main

sys.exit(main())
