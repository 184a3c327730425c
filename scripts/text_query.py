#!/usr/bin/env python
"""``c2vkd-text-query`` (c2vkd_hf/cli/text_query.py), kept as a script for ``accelerate launch scripts/text_query.py``."""
import sys

from c2vkd_hf.cli.text_query import main, run  # noqa: F401  (main: for code that imports this script)

if __name__ == "__main__":
    sys.exit(run())
