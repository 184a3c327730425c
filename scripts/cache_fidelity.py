#!/usr/bin/env python
"""How closely does geometric replay of cached teacher outputs match running the teacher online?

    python scripts/cache_fidelity.py CONFIG.json [--num_crops 367] [--out benchmarks/speed/fidelity.json]

``CONFIG.json``: a ``distill.py`` config file with ``teacher_cache`` (built first if missing). Draws
the training views exactly as training does (``--seed``, epoch 0, the config's resize / scale / crop /
flip), runs the teacher online on each augmented crop and replays the cache under the same geometry,
and reports, treating the online prediction as the reference:

* ``pixel_agreement``: fraction of pixels where argmax(cached) == argmax(online); ``miou_agreement``:
  mIoU of argmax(cached) against argmax(online) (:class:`~c2vkd_hf.metrics.StreamingMeanIoU`);
  each over all crop pixels and over the pixels with a valid ground-truth label (which excludes the
  padding of down-scaled views, where the online teacher sees a blank border);
* ``feature_cosine``: mean cosine similarity of replayed and online teacher feature maps per position;
* the teacher's mIoU against the ground truth on these crops, online and cached.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from c2vkd_hf.cache import TeacherCache, build_teacher_cache
from c2vkd_hf.config import IGNORE_INDEX
from c2vkd_hf.data import build_transform, collate_fn, load_segmentation_data, with_example_index
from c2vkd_hf.metrics import StreamingMeanIoU
from c2vkd_hf.models import forward_features, image_mean_std, load_teacher

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_teacher import parse_args, teacher_feature_names  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--num_crops", type=int, default=None, help="Default: one epoch of the training set.")
    parser.add_argument("--seed", type=int, default=None, help="Augmentation seed (default: the config's seed or 0).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/speed/fidelity.json")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    config = json.loads(Path(args.config).read_text())
    seed = args.seed if args.seed is not None else int(config.get("seed", 0))
    dist_args, data_args, _ = parse_args([args.config])
    data = load_segmentation_data(data_args)
    teacher = load_teacher(dist_args.teacher_name_or_path).eval()
    names = teacher_feature_names(dist_args, teacher)
    mean, std = image_mean_std(teacher)
    reference = (data_args.resize_height, data_args.resize_width) if data_args.resize_height else None
    key = build_teacher_cache(dist_args.teacher_cache, teacher, data.train, reference_size=reference,
                              teacher_mean_std=(mean, std), feature_names=names,
                              top_k=dist_args.teacher_cache_top_k)
    cache = TeacherCache(dist_args.teacher_cache, expected_key=key)

    transform = build_transform(data_args, mean, std, train=True, seed=seed)
    transform.return_geometry = transform.return_index = True
    dataset = with_example_index(data.train).with_transform(transform)
    count = min(args.num_crops or len(dataset), len(dataset))
    loader = DataLoader(Subset(dataset, range(count)), batch_size=args.batch_size, collate_fn=collate_fn)
    k = len(data.id2label)
    agree_all, agree_valid = StreamingMeanIoU(k, IGNORE_INDEX), StreamingMeanIoU(k, IGNORE_INDEX)
    online_gt, cached_gt = StreamingMeanIoU(k, IGNORE_INDEX), StreamingMeanIoU(k, IGNORE_INDEX)
    cos_sum, cos_n, padded = 0.0, 0, 0
    start = time.time()
    for batch in loader:
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        if names:
            online, feats = forward_features(teacher, pixel_values)
            online_feats = [feats[n] for n in names]
        else:
            online, online_feats = teacher(pixel_values=pixel_values).logits, []
        cached, cached_feats = cache.replay(batch["example_index"], batch["geometry"], names)
        size = labels.shape[-2:]
        online = torch.nn.functional.interpolate(online.float(), size=size, mode="bilinear", align_corners=False)
        cached = torch.nn.functional.interpolate(cached, size=size, mode="bilinear", align_corners=False)
        reference_pred, cached_pred = online.argmax(1), cached.argmax(1)
        agree_all.update(cached_pred, reference_pred)
        agree_valid.update(cached_pred, torch.where(labels == IGNORE_INDEX, IGNORE_INDEX, reference_pred))
        online_gt.update(reference_pred, labels)
        cached_gt.update(cached_pred, labels)
        padded += sum(g.scaled_size[0] < g.crop_box[2] or g.scaled_size[1] < g.crop_box[3] for g in batch["geometry"])
        for a, b in zip(online_feats, cached_feats):
            if a.shape != b.shape:
                b = torch.nn.functional.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)
            cos = torch.nn.functional.cosine_similarity(a.float(), b, dim=1)
            cos_sum, cos_n = cos_sum + float(cos.sum()), cos_n + cos.numel()
    results = {
        "config": args.config, "crops": count, "seed": seed, "epoch": 0, "views_with_padding": int(padded),
        "teacher": dist_args.teacher_name_or_path, "teacher_cache": dist_args.teacher_cache,
        "top_k": dist_args.teacher_cache_top_k, "feature_names": names,
        "pixel_agreement_all": agree_all.compute()["overall_accuracy"],
        "miou_agreement_all": agree_all.compute()["mean_iou"],
        "pixel_agreement_valid": agree_valid.compute()["overall_accuracy"],
        "miou_agreement_valid": agree_valid.compute()["mean_iou"],
        "feature_cosine": cos_sum / cos_n if cos_n else None,
        "teacher_miou_vs_labels_online": online_gt.compute()["mean_iou"],
        "teacher_miou_vs_labels_cached": cached_gt.compute()["mean_iou"],
        "seconds": round(time.time() - start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
