"""``python -m flowgrpo ...``: see :mod:`flowgrpo.cli`."""

import sys

from .cli import main

sys.exit(main())
