"""`python -m lnsp`: the same entry point as the `lnsp` command."""

import lnsp  # noqa: F401  (sets the thread variables before any heavy import)
from lnsp.cli import main

if __name__ == "__main__":
    main()
