"""``python -m app <command>``: ``local`` (whole stack on this machine) or any Faust command (``worker``)."""

from __future__ import annotations

import sys

from app.cli import main

if __name__ == "__main__":
    sys.exit(main())
