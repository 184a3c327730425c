"""2-process CPU training (gloo) gives the same weights as 1 process with the same global batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(tmp_path: Path, nproc: int, per_device: int) -> dict:
    out = tmp_path / f"n{nproc}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
           str(HERE / "distributed_train.py"), str(out), str(per_device)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / "weights.pt", weights_only=True)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    one = _run(tmp_path, 1, 8)
    two = _run(tmp_path, 2, 4)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=2e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
