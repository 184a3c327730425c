"""Segmentation data: sources, label handling, validation, paired image+mask transforms and the decoded cache.

Every source ends up as :class:`SegmentationData`: two ``datasets.Dataset`` splits with the columns
``image`` (PIL RGB) and ``label`` (PIL mode ``"L"`` class-index masks in which
:data:`~c2vkd_hf.config.IGNORE_INDEX` = 255 marks pixels to ignore), plus ``id2label``.

One module per job:

* :mod:`.base`: :class:`SegmentationData` and :class:`DataValidationError`;
* :mod:`.sources`: :func:`load_segmentation_data` (local folders, a SegNet/CamVid layout,
  ``datasets`` from the Hub or disk, the synthetic set) and :func:`source_paths`;
* :mod:`.labels`: labels files (:func:`load_labels_file`), palettes (:func:`default_palette`,
  :func:`colorize`, :func:`rgb_to_index`) and the mapping of the dataset's label values to the
  internal ones (void -> 255, ``--reduce_labels``);
* :mod:`.checks`: the validation of every image and mask file before any training starts;
* :mod:`.synthetic`: the procedural street scenes (:func:`make_synthetic_dataset`);
* :mod:`.transforms`: the train/eval :class:`SegmentationTransform` (seeded per example, returning
  its :class:`Geometry` when the teacher cache needs it), :func:`collate_fn`;
* :mod:`.decoded`: the decoded-dataset cache (each split decoded once into memory maps; imported
  from ``c2vkd_hf.data.decoded``).
"""

from .base import DataValidationError, SegmentationData
from .labels import colorize, default_palette, load_labels_file, rgb_to_index
from .sources import load_segmentation_data, source_paths
from .synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE, make_synthetic_dataset
from .transforms import (
    INDEX_COLUMN,
    VALID_SIZES,
    AugmentationEpochCallback,
    Geometry,
    SegmentationTransform,
    apply_geometry,
    augmentation_generator,
    build_transform,
    collate_fn,
    keep_ratio_size,
    sample_geometry,
    unpad_to_labels,
    with_example_index,
)

__all__ = [
    "DataValidationError",
    "SegmentationData",
    "load_segmentation_data",
    "load_labels_file",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_PALETTE",
    "make_synthetic_dataset",
    "Geometry",
    "sample_geometry",
    "augmentation_generator",
    "with_example_index",
    "AugmentationEpochCallback",
    "INDEX_COLUMN",
    "apply_geometry",
    "SegmentationTransform",
    "build_transform",
    "collate_fn",
    "VALID_SIZES",
    "keep_ratio_size",
    "unpad_to_labels",
    "default_palette",
    "colorize",
    "rgb_to_index",
    "source_paths",
]
