"""``python -m qtcompress.cli``."""

import sys

from qtcompress.cli import main

sys.exit(main())
