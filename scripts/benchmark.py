#!/usr/bin/env python
"""The benchmark command from a clone (the same as ``c2vkd-benchmark``; see ``--help``)."""

import sys
from pathlib import Path

from c2vkd_hf.cli.benchmark import run

if __name__ == "__main__":
    sys.exit(run(["--root", str(Path(__file__).resolve().parents[1]), *sys.argv[1:]]))
