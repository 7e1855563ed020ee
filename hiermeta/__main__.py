"""``python -m hiermeta``: the command line (:mod:`hiermeta.cli`)."""

import sys

from .cli import main

sys.exit(main())
