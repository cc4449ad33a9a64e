"""``python -m svdquant.cli``: the ``svdquant`` command."""

import sys

from . import main

sys.exit(main())
