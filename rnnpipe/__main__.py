"""``python -m rnnpipe``: the ``rnnpipe`` command."""

import sys

from rnnpipe.launch.cli import main

sys.exit(main())
