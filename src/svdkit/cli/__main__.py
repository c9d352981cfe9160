"""``python -m svdkit.cli``: the same as the ``svdkit`` command."""

import sys

from . import main

sys.exit(main())
