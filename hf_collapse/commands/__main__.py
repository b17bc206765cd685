"""``python -m hf_collapse.commands``: the ``hf-collapse`` command."""

import sys

from . import main

sys.exit(main())
