"""`python -m promptseg ...`: the `promptseg` command (how `bench run` starts each run)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
