"""``python -m pecker_kernels``: see pecker_kernels.cli."""

import sys

from .cli import main

sys.exit(main())
