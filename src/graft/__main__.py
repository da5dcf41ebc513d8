"""`python -m graft VERB ...` (also what torchrun launches)."""

import sys

from graft.cli import main

sys.exit(main())
