"""`python -m splitwise.entrypoints.api_server [serve flags]`: the same as `splitwise serve`."""

from __future__ import annotations

import sys

from splitwise.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "serve", *sys.argv[1:]]
    main()
