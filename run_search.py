#!/usr/bin/env python
"""Entry point: `python run_search.py` runs the demo search; `--help` lists the commands."""
import sys

from tune_upl.cli import main

if __name__ == "__main__":
    sys.exit(main())
