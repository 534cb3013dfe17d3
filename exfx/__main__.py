"""``python -m exfx``: the same as the ``exfx`` command."""

import sys

from exfx.cli import main

sys.exit(main())
