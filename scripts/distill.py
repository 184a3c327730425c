#!/usr/bin/env python
"""``c2vkd-distill`` (c2vkd_hf/cli/distill.py), kept as a script for ``accelerate launch scripts/distill.py``."""
import sys

from c2vkd_hf.cli.distill import main, run  # noqa: F401  (main: for code that imports this script)

if __name__ == "__main__":
    sys.exit(run())
