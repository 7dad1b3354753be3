"""``python -m pagefork`` runs the command line."""

import sys

from pagefork.cli import main

sys.exit(main())
