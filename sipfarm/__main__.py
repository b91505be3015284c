"""``python -m sipfarm``: the same as the ``sipfarm`` command."""

import sys

from sipfarm.cli import main

sys.exit(main())
