"""``python -m cnnrepair``: the ``cnnrepair`` command."""

import sys

from cnnrepair.cli import main

sys.exit(main())
