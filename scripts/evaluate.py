#!/usr/bin/env python
"""``c2vkd-evaluate`` (c2vkd_hf/cli/evaluate.py), kept as a script for ``accelerate launch scripts/evaluate.py``."""
import sys

from c2vkd_hf.cli.evaluate import main, run  # noqa: F401  (main: for code that imports this script)

if __name__ == "__main__":
    sys.exit(run())
