"""``python -m training ...`` is ``cxr-triage cache|train|evaluate|export|download ...``."""

import sys

from training.cli import main

sys.exit(main())
