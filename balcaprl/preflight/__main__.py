"""``python -m balcaprl.preflight RECIPE`` (the same as ``balcaprl preflight RECIPE``)."""

import sys

from balcaprl.preflight.run import main

sys.exit(main())
