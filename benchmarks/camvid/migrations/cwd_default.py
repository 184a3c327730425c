"""One-off relabelling of the long-protocol CamVid records when C2VKD's default gained the channel-wise term,
decaying to 0 at half of training (session 13; FINDINGS section 0l).

``c2vkd-exit-cwd-decay`` (``--channel_weight 3 --weight_schedules exit:linear:0.5,channel:linear:0.5`` on top of the
exits default) passed the benchmark's rule for a default on five paired seeds; its records are the same trainings
as the new default and become the table's ``c2vkd`` rows. The records made without the term become the ablation
``c2vkd-nocwd`` (``--channel_weight 0``), and ablations made on that default now ablate it. Stop every benchmark
process first.

    python benchmarks/camvid/migrations/cwd_default.py . outputs/benchmark-camvid
"""
import json
import sys
from pathlib import Path

from c2vkd_hf.benchmark import change_default

if __name__ == "__main__":
    repo, work = Path(sys.argv[1]), Path(sys.argv[2])
    done = change_default(repo / "benchmarks" / "camvid", work, "long", "c2vkd", promote="c2vkd-exit-cwd-decay",
                          demote_as="c2vkd-nocwd", demote_flags=["--channel_weight", "0"])
    print(json.dumps(done))
