"""``python -m customdiff``: the command line, as ``accelerate launch -m customdiff train …`` runs it."""

import sys

from customdiff.cli import main

sys.exit(main())
