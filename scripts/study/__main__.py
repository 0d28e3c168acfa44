"""python -m scripts.study CONFIG [--flags]: see scripts/study/runner.py."""

import sys

from scripts.study.runner import main

sys.exit(main())
