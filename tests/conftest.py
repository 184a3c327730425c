"""Shared test set-up: tiny models run fastest on one thread on a busy 2-core CPU."""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

#: ../shared beside the repository (CI runs in a clean clone next to it)
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} (real data and models) is absent on this machine")
    return SHARED
