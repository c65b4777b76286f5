"""`python -m fpmgm_hf.evaluation sweep|train-lm ...`: the `fpmgm-eval` CLI."""

import sys

from .sweep import main

sys.exit(main())
