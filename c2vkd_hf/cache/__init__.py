"""Teacher-output cache: run the frozen teacher once, then replay its outputs under each training view.

Why: on a CPU the teacher's forward pass costs several student training steps. The cache stores, for
every training example, what the distillation loss reads from the teacher (its logits and the named
feature maps of the configured feature pairs), computed once at a fixed **reference geometry**: the
image resized to the reference size (the data's ``--resize_height/--resize_width``, else the images'
common size), no crop, no flip. During training each batch carries its examples' row numbers
(``example_index``) and their :class:`~c2vkd_hf.data.Geometry`; :meth:`TeacherCache.replay` reads those
rows and applies the same rescale, crop and flip to the cached maps (:func:`replay_maps`), so the
teacher never runs.

Fidelity: replay equals the online teacher exactly when the teacher commutes with the geometry
(e.g. identity or flip for a flip-equivariant model); in general it approximates the teacher's output
on the transformed image (a CNN is not scale-equivariant; ``scripts/cache_fidelity.py`` measures how
closely). Padding (a crop reaching beyond a down-scaled image) replays as 0 (uniform logits, zero
features), where the online teacher would see a padded image.

Storage (one folder):

* ``cache_meta.json``: format version, the key (below), one entry per array (file, dtype, shape) and
  ``disk_bytes`` (the arrays' size, :func:`~.size.teacher_cache_bytes`; not part of the key, older caches
  lack it); written last at creation, through a temporary file and ``os.replace``. A folder without it
  is not a cache (an interrupted creation is started again).
* ``logits.npy`` (N, K, h, w) float16, or with ``top_k`` = k: ``logits_topk_values.npy``
  (N, k + 1, h, w) float16 (the k largest logits, then one "rest" logit per pixel, chosen so that
  every other class gets an equal share of the remaining softmax mass: the top-k probabilities are
  exact) and ``logits_topk_indices.npy`` (N, k, h, w) uint8 (int16 beyond 256 classes).
* ``feature_<name>.npy`` (N, C, h, w) float16 for each stored feature map.
* ``rows_done.npy`` (N,) uint8: the completion marker of each row.

All arrays are ``.npy`` files opened with ``numpy`` memory maps, so neither building nor training
holds the cache in RAM; readers open them read-only and drop the pages they read from their resident
set after copying the rows out (the kernel keeps them in its shared page cache). A row is written to every array, the arrays are
flushed (``msync``), and only then is the row's marker set and flushed: an interrupted build resumes
with the rows whose marker is unset, and a reader refuses a cache in which any marker is unset, so a
half-written row is never read.

Key (:func:`cache_key`), stored in the metadata and compared on every open: the teacher's weights
(SHA-256 of its state dict), the dataset (number of examples and a SHA-256 over the image files'
bytes, in row order; in-memory images by their bytes), and the preprocessing (reference size, the
teacher's input mean/std, the stored feature names, ``top_k``, dtype). A mismatch raises
:class:`TeacherCacheError` naming each differing part and how to rebuild.

Several processes: building shards the missing rows by rank (``rank::world_size``; rank 0 creates the
files, then every rank fills its share into the shared memory maps; markers are one byte per row, so
ranks never write the same bytes); reading needs nothing but read-only maps. This relies on a local
file system with shared memory maps (not a network file system without coherent ``mmap``).

Size: the arrays are created at full length but sparse, and before the teacher runs over the data a build
logs the cache's size in one line and refuses (:class:`~.size.TeacherCacheSpaceError`, a
:class:`~c2vkd_hf.validation.UserInputError`) when the rows still to write would not fit in the free space of
the folder's file system (:mod:`.size`).

Modules: :mod:`.key` (the key and its check), :mod:`.replay` (top-k logits, geometric replay), :mod:`.files` (file
names, metadata, memory maps, status), :mod:`.size` (size on disk, free-space check), :mod:`.build`
(:func:`build_teacher_cache`), :mod:`.reader` (:class:`TeacherCache`).
"""

from .build import build_teacher_cache
from .files import DONE_NAME, META_NAME, CacheStatus, cache_status
from .key import (CACHE_VERSION, TeacherCacheError, cache_key, dataset_fingerprint, key_differences,
                  teacher_weights_hash)
from .reader import TeacherCache
from .replay import replay_grid, replay_maps, replay_output_size, topk_compress, topk_expand
from .size import TeacherCacheSpaceError, teacher_cache_bytes

__all__ = [
    "TeacherCacheError", "CACHE_VERSION", "teacher_weights_hash", "dataset_fingerprint", "cache_key",
    "key_differences", "topk_compress", "topk_expand", "replay_grid", "replay_maps", "replay_output_size",
    "build_teacher_cache", "TeacherCache", "CacheStatus", "cache_status", "DONE_NAME", "META_NAME",
    "teacher_cache_bytes", "TeacherCacheSpaceError",
]
