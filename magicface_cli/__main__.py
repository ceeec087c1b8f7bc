"""`python -m magicface_cli ...`, the same as the `magicface` script."""

import sys

from .app import main

sys.exit(main())
