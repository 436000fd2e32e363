"""``python -m app <command>``: the click group of app/cli.py (``python -m app --help`` lists the commands)."""

from __future__ import annotations

from app.cli import main

if __name__ == "__main__":
    main()
