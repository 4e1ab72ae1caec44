"""``python -m lssf_lightning``: the ``lssf-lightning`` command."""

import sys

from lssf_lightning.cli import main

if __name__ == "__main__":
    sys.exit(main())
