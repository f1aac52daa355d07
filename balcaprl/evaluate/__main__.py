"""``python -m balcaprl.evaluate ...``: the same command line as ``balcaprl evaluate ...``."""

import sys

from balcaprl.evaluate.cli import main

sys.exit(main())
