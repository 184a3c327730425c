#!/usr/bin/env python
"""``c2vkd-benchmark`` (c2vkd_hf/cli/benchmark.py), kept as a script for a clone."""
import sys

from c2vkd_hf.cli.benchmark import main, run  # noqa: F401  (main: for code that imports this script)

if __name__ == "__main__":
    sys.exit(run())
