"""Builds one tiny teacher cache with every process of a ``torchrun --nproc_per_node N`` run (gloo on CPU), then
opens it on every rank and replays rows; run by test_distributed.py, which compares it with a one-process build.

``python -m torch.distributed.run --nproc_per_node=2 distributed_cache.py CACHE_DIR OUT_DIR`` writes
``OUT_DIR/rank<r>.pt`` on each rank: the rows it read and replayed, the rows its teacher computed and how often its
teacher ran. :func:`build` and :func:`replay` are also what the test runs in its own process (world size 1)."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

from c2vkd_hf.cache import TeacherCache, build_teacher_cache
from c2vkd_hf.data import Geometry, SegmentationTransform, make_synthetic_dataset
from c2vkd_hf.models import IMAGENET_MEAN, IMAGENET_STD
from tiny import tiny_teacher

#: An odd number of rows (an uneven split over 2 ranks: 5 and 4) in batches of 2, smaller than a rank's share. With
#: 9 rows every row is computed in a batch of the same size by 1 process ((0, 1), ..., (6, 7), (8)) and by 2 ((0, 2),
#: (4, 6), (8) and (1, 3), (5, 7)): the teacher's float32 outputs on a CPU differ in the last bits between a batch of
#: 1 and of 2 (~1e-7), which can flip a float16 value, so only then can the two caches be compared bit for bit.
NUM_ROWS = 9
REFERENCE_SIZE = (32, 40)
FEATURES = ["stage1", "stage4", "decoder"]
BATCH_SIZE = 2
#: views replayed per row (cycled): identity, flip, crop + flip, up-scaled crop, down-scaled view with padding
GEOMETRIES = [
    Geometry((32, 40), (0, 0, 32, 40), False),
    Geometry((32, 40), (0, 0, 32, 40), True),
    Geometry((32, 40), (4, 8, 24, 24), True),
    Geometry((48, 60), (8, 10, 32, 40), False),
    Geometry((24, 30), (0, 0, 32, 40), True),
]


def dataset():
    return make_synthetic_dataset(NUM_ROWS, 36, 44, seed=11)  # resized to REFERENCE_SIZE by the build


def build(directory, **distributed) -> dict:
    """Builds (or resumes, or finds complete) the cache in ``directory`` with the tiny teacher; ``distributed``:
    ``rank``/``world_size``/``barrier`` for :func:`build_teacher_cache` (none: it takes them from the process
    group). Returns the key, the rows this process's teacher computed (in order) and how many times it ran."""
    data = dataset()
    teacher = tiny_teacher()
    transform = SegmentationTransform(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, train=False,
                                      resize=REFERENCE_SIZE)
    inputs = torch.stack(transform({"image": list(data["image"])})["pixel_values"])
    computed, calls = [], [0]

    def record(module, args, kwargs):  # which rows the teacher sees, by their pixels (a blank probe matches none)
        calls[0] += 1
        for image in kwargs["pixel_values"]:
            computed.extend(i for i in range(NUM_ROWS)
                            if image.shape == inputs[i].shape and torch.equal(image, inputs[i]))

    handle = teacher.register_forward_pre_hook(record, with_kwargs=True)
    try:
        key = build_teacher_cache(directory, teacher, data, reference_size=REFERENCE_SIZE,
                                  teacher_mean_std=(IMAGENET_MEAN, IMAGENET_STD), feature_names=FEATURES,
                                  batch_size=BATCH_SIZE, progress=False, **distributed)
    finally:
        handle.remove()
    return {"key": json.dumps(key, sort_keys=True), "computed_rows": computed, "teacher_calls": calls[0]}


def replay(directory, key_json: str) -> dict:
    """Rows 0..NUM_ROWS-1 of the complete cache in ``directory`` (checked against the key), read at the reference
    geometry and replayed under :data:`GEOMETRIES`."""
    cache = TeacherCache(directory, expected_key=json.loads(key_json))
    rows = list(range(NUM_ROWS))
    logits, features = cache.read(rows)
    out = {"num_rows": len(cache), "read_logits": logits,
           **{f"read_{n}": f for n, f in zip(cache.feature_names, features)}}
    for g, geometry in enumerate(GEOMETRIES):  # one geometry for every row: replay stacks views of one size
        logits, features = cache.replay(rows, [geometry] * NUM_ROWS)
        out[f"replay{g}_logits"] = logits
        out.update({f"replay{g}_{n}": f for n, f in zip(cache.feature_names, features)})
    return out


if __name__ == "__main__":
    import torch.distributed as dist

    from c2vkd_hf.jobs import end_distributed

    cache_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # torchrun's env://; the build finds the group
    rank, world_size = dist.get_rank(), dist.get_world_size()
    result = build(cache_dir)  # rank, world size and barrier from torch.distributed
    result.update(replay(cache_dir, result["key"]), rank=rank, world_size=world_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(result, out_dir / f"rank{rank}.pt")
    print(f"rank {rank}/{world_size}: teacher ran {result['teacher_calls']} times, computed rows "
          f"{result['computed_rows']}", flush=True)
    dist.barrier()  # every rank has read the cache and saved
    end_distributed()
    # Skip interpreter teardown, as distributed_train.py does (a gloo rank has aborted in it).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
