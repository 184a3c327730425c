"""Shared test set-up: tiny models run fastest on one thread on a busy 2-core CPU."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

# the decoded-dataset cache (c2vkd_hf/data/decoded.py) of the tests' runs lives in a throw-away folder, not ~/.cache
if "C2VKD_HF_CACHE" not in os.environ:
    os.environ["C2VKD_HF_CACHE"] = tempfile.mkdtemp(prefix="c2vkd-test-cache-")
    atexit.register(shutil.rmtree, os.environ["C2VKD_HF_CACHE"], True)

#: ../shared beside the repository (CI runs in a clean clone next to it)
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} (real data and models) is absent on this machine")
    return SHARED
