#!/usr/bin/env python
"""``c2vkd-train-teacher`` (c2vkd_hf/cli/train_teacher.py), kept as a script for ``accelerate launch scripts/train_teacher.py``."""
import sys

from c2vkd_hf.cli.train_teacher import main, run  # noqa: F401  (main: for code that imports this script)

if __name__ == "__main__":
    sys.exit(run())
