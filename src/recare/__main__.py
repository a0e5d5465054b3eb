"""`python -m recare` runs the command line."""

import sys

from recare.cli import main

sys.exit(main())
