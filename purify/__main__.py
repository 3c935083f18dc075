"""``python -m purify`` is the ``purify`` command."""

import sys

from purify.cli import main

sys.exit(main())
