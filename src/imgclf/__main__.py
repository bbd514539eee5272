"""``python -m imgclf`` runs the CLI (used by components and subprocess tests)."""

import sys

from imgclf.cli import main

sys.exit(main())
