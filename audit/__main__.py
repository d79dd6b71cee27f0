"""python -m audit: the model-audit command."""

import sys

from audit.cli import main

sys.exit(main())
