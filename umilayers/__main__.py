"""``python -m umilayers ...`` runs the command line (see :mod:`umilayers.cli`)."""

import sys

from umilayers.cli import main

if __name__ == "__main__":
    sys.exit(main())
