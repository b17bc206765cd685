"""``python -m hf_collapse``: the ``hf-collapse`` command."""

import sys

from .commands import main

sys.exit(main())
