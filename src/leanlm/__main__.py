"""`python -m leanlm VERB ...`: the same command line as the `leanlm` console script."""

import sys

from .cli import main

sys.exit(main())
