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
    # faulthandler: should a rank die on a signal, its Python stack is in the failure message
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
           "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
           str(HERE / "distributed_train.py"), str(out), str(per_device)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return torch.load(out / "weights.pt", weights_only=True)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    one = _run(tmp_path, 1, 8)
    two = _run(tmp_path, 2, 4)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=2e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("outcome", ["returns", "user_error", "bug"])
def test_a_script_shuts_its_process_group_down_when_it_returns_a_code(tmp_path, outcome):
    """Finished or stopped on a user error: the group is shut down. A bug propagates and leaves the group to
    the launcher (a shutdown could wait on ranks still inside a collective)."""
    import torch.distributed as dist

    from c2vkd_hf.jobs import EXIT_USER_ERROR, run_script
    from c2vkd_hf.validation import UserInputError

    def main(argv):
        assert dist.is_initialized()
        if outcome == "user_error":
            raise UserInputError("bad flag")
        if outcome == "bug":
            raise RuntimeError("a bug")

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        if outcome == "bug":
            with pytest.raises(RuntimeError, match="a bug"):
                run_script(main, [])
            assert dist.is_initialized()
        else:
            assert run_script(main, []) == (EXIT_USER_ERROR if outcome == "user_error" else 0)
            assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _children(pid: int) -> list[int]:
    """The process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return sorted(out)


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_after_one_checkpoint(tmp_path):
    """Two gloo processes under torchrun; SIGTERM reaches one worker only. Both finish the same step, one
    consistent checkpoint is saved and both exit 143, each saying so in one line."""
    import signal
    import time

    from tiny import TINY_SEGFORMER_JSON

    from c2vkd_hf.trainer import last_complete_checkpoint

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(HERE.parent / "scripts" / "distill.py"), "--output_dir", str(out), "--method", "none",
           "--synthetic_train_size", "16", "--synthetic_validation_size", "4", "--synthetic_height", "32",
           "--synthetic_width", "32", "--student_config_overrides", TINY_SEGFORMER_JSON, "--max_steps", "200",
           "--save_steps", "1000", "--eval_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
           "--per_device_train_batch_size", "2", "--train_baseline", "false", "--use_cpu", "true"]
    log_path = tmp_path / "log.txt"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while "step 3/" not in log_path.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) == 2, log_path.read_text()[-3000:]
        os.kill(workers[1], signal.SIGTERM)
        proc.wait(timeout=120)
    text = log_path.read_text()
    assert text.count("stopped: ") == 2, text[-4000:]
    assert "SIGTERM received" in text and "a signal to another process received" in text
    last = last_complete_checkpoint(str(out))
    assert last is not None and not (out / "results.json").exists()


@pytest.mark.slow
def test_a_rank_that_fails_ends_every_rank_in_bounded_time(tmp_path):
    """Two gloo processes; rank 1 stops on a bad example at step 2 (exit 2, one line). The launcher ends rank 0,
    which would otherwise wait at the next gradient all-reduce until the process group timeout: both are gone within
    the timeout, the run is non-zero, and the failing rank's message is shown once."""
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(HERE / "distributed_fail.py"), str(tmp_path / "run")]
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    elapsed = time.time() - start
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert text.count("error: train/img7.png: label values [9]") == 1, text[-3000:]
    assert elapsed < 120, f"took {elapsed:.0f} s"


def _run_cache(cache_dir: Path, out: Path, nproc: int = 2) -> tuple[list[dict], str]:
    """``distributed_cache.py`` under torchrun with ``nproc`` gloo processes: each rank's saved results (by rank) and
    the run's log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
           "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
           str(HERE / "distributed_cache.py"), str(cache_dir), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(nproc)], log


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """``{file name: (size, mtime in ns)}`` of every file in ``directory``."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


@pytest.mark.slow
def test_two_processes_build_one_teacher_cache_equal_to_a_one_process_build(tmp_path):
    """Two gloo ranks build one teacher cache together (each its rows rank::2, the process group found by the
    build itself), then both read and replay it: every array equals the one-process cache's bit for bit, the
    metadata is the same, every row is done, and each rank computed exactly its own rows. Run again on the complete
    cache, the ranks rebuild nothing."""
    import json

    import numpy as np

    import distributed_cache as spec
    from c2vkd_hf.cache import DONE_NAME, META_NAME

    single_dir, shared_dir = tmp_path / "one", tmp_path / "two"
    single = spec.build(single_dir, rank=0, world_size=1, barrier=lambda: None)
    assert single["computed_rows"] == list(range(spec.NUM_ROWS))
    single.update(spec.replay(single_dir, single["key"]))

    ranks, log = _run_cache(shared_dir, tmp_path / "out1")
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    # the split: each rank ran the teacher on its rows rank::2 only, together on every row once
    for rank, result in enumerate(ranks):
        assert result["computed_rows"] == list(range(rank, spec.NUM_ROWS, 2)), (rank, result["computed_rows"], log)
    # the files: the same arrays, bit for bit, the same metadata, every row done
    names = sorted(p.name for p in single_dir.iterdir())
    assert sorted(p.name for p in shared_dir.iterdir()) == names
    arrays = [n for n in names if n.endswith(".npy")]
    assert {"logits.npy", DONE_NAME} <= set(arrays) and len(arrays) == 2 + len(spec.FEATURES)
    for name in arrays:
        one, two = np.load(single_dir / name), np.load(shared_dir / name)
        assert one.dtype == two.dtype and one.shape == two.shape, name
        differ = sorted({int(i) for i in np.argwhere(one != two)[:, 0]})
        assert np.array_equal(one, two), f"{name}: rows {differ} differ"
    assert np.load(shared_dir / DONE_NAME).tolist() == [1] * spec.NUM_ROWS
    meta_one = json.loads((single_dir / META_NAME).read_text())
    meta_two = json.loads((shared_dir / META_NAME).read_text())
    assert meta_two["key"] == meta_one["key"] and meta_two == meta_one
    assert all(r["key"] == single["key"] for r in ranks)
    # both ranks read and replayed the same tensors as the one process
    tensors = [k for k, v in single.items() if isinstance(v, torch.Tensor)]
    assert len(tensors) == (1 + len(spec.GEOMETRIES)) * (1 + len(spec.FEATURES))
    for result in ranks:
        assert result["num_rows"] == spec.NUM_ROWS and sorted(k for k, v in result.items()
                                                             if isinstance(v, torch.Tensor)) == sorted(tensors)
        for k in tensors:
            assert torch.equal(result[k], single[k]), f"rank {result['rank']}: {k}"

    # the complete cache again: no rank runs the teacher (not even its shape probe) or writes a file
    before = _snapshot(shared_dir)
    again, log_again = _run_cache(shared_dir, tmp_path / "out2")
    assert _snapshot(shared_dir) == before
    for result in again:
        assert result["computed_rows"] == [] and result["teacher_calls"] == 0, (result["rank"], log_again)
        assert result["key"] == single["key"]
        for k in tensors:
            assert torch.equal(result[k], single[k]), f"rank {result['rank']}, second run: {k}"
    assert "still to write" not in log_again and "free in" not in log_again
    assert log.count("free in") == 1  # the first run: rank 0 logged the cache's size, once
