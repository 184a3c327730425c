#!/usr/bin/env bash
# The same-metrics check of a refactor (#39): two fixed-seed runs whose every metric must come out to the last digit
# the same before and after. Run from a project root (the tree under test):
#   OMP_NUM_THREADS=1 bash benchmarks/refactor/run.sh OUT_DIR
# 1. a short CamVid run: C2VKD with every default, live teacher, 60 steps, seed 0, evaluated on val at the end;
# 2. the default main job (synthetic data, its own small teacher, the no-teacher baseline, C2VKD), seed 0.
# Each run's results.json lands in OUT_DIR; compare two trees with benchmarks/refactor/compare.py.
set -euo pipefail
out=${1:?usage: run.sh OUT_DIR}
mkdir -p "$out"
data=../shared/data/camvid
python scripts/distill.py --output_dir "$out/camvid-short" --retrain true --seed 0 --disable_tqdm true \
  --train_images $data/train --train_labels $data/trainannot \
  --validation_images $data/val --validation_labels $data/valannot --labels_file $data/classes.json \
  --resize_height 120 --resize_width 160 --teacher_name_or_path ../shared/models/camvid-upernet-lite0 \
  --text_embeddings ../shared/data/clip_text/camvid11_from_city_ViT16_clip_text.pth \
  --per_device_train_batch_size 8 --per_device_eval_batch_size 8 --max_steps 60 --eval_strategy no \
  --report_to none --train_baseline false > "$out/camvid-short.log" 2>&1
python scripts/distill.py --output_dir "$out/default-job" --retrain true --disable_tqdm true \
  > "$out/default-job.log" 2>&1
echo "done: $out"
