"""Argument dataclasses parsed with :class:`transformers.HfArgumentParser`.

``TrainingArguments`` stays transformers' own; these two dataclasses hold everything else:

* :class:`DataArguments`: where the data comes from and how it is augmented;
* :class:`DistillationArguments`: teacher, student, method, loss weights and temperatures, text
  embeddings.

Every loss constant documented in ``c2vkd_hf.losses`` has a flag here; the defaults are the
project's defaults (see the module docstrings of ``c2vkd_hf.losses`` for the formulas).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

from .constants import IGNORE_INDEX  # noqa: F401  (defined in constants; kept importable from here)

METHODS = ("c2vkd", "kd", "cwd", "dist", "dkd", "none")


@dataclass
class DataArguments:
    """Where the segmentation data comes from, and how it is transformed.

    Exactly one source is used, in this order of precedence: local folders
    (``train_images``/``train_labels``/...), a Hub or local ``datasets`` dataset
    (``dataset_name``), or the built-in synthetic dataset (``dataset_name="synthetic"``, default).
    """

    dataset_name: str = field(
        default="synthetic",
        metadata={"help": "'synthetic' (built-in procedural scenes), or a Hub dataset id / local path "
                  "for datasets.load_dataset. Ignored when --train_images is given."},
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "datasets config name."})
    image_column: str = field(default="image", metadata={"help": "Image column of a datasets dataset."})
    label_column: str = field(default="label", metadata={"help": "Mask column of a datasets dataset."})
    train_split: str = field(default="train", metadata={"help": "Training split name."})
    validation_split: str = field(default="validation", metadata={"help": "Evaluation split name."})
    train_images: Optional[str] = field(default=None, metadata={"help": "Folder of training images."})
    train_labels: Optional[str] = field(default=None, metadata={"help": "Folder of training masks (same file stems)."})
    validation_images: Optional[str] = field(default=None, metadata={"help": "Folder of validation images."})
    validation_labels: Optional[str] = field(default=None, metadata={"help": "Folder of validation masks."})
    labels_file: Optional[str] = field(
        default=None,
        metadata={"help": "JSON: a list of class names, or an object with 'classes' and optional "
                  "'ignore_index' (the dataset's own void value, mapped to 255)."},
    )
    dataset_ignore_index: Optional[int] = field(
        default=None,
        metadata={"help": "The dataset's own void label value, mapped to the internal ignore value 255 "
                  "(overrides labels_file's ignore_index)."},
    )
    reduce_labels: bool = field(
        default=False,
        metadata={"help": "Label 0 is background to ignore: 0 -> 255, every other value v -> v - 1."},
    )
    synthetic_train_size: int = field(default=64, metadata={"help": "Synthetic dataset: training images."})
    synthetic_validation_size: int = field(default=16, metadata={"help": "Synthetic dataset: validation images."})
    synthetic_height: int = field(default=64, metadata={"help": "Synthetic dataset: image height."})
    synthetic_width: int = field(default=64, metadata={"help": "Synthetic dataset: image width."})
    synthetic_seed: int = field(default=0, metadata={"help": "Synthetic dataset: seed."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the training split."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the validation split."})
    resize_height: Optional[int] = field(
        default=None, metadata={"help": "Images (train and eval) are first resized to this height (default: keep)."}
    )
    resize_width: Optional[int] = field(default=None, metadata={"help": "Resize width (with resize_height)."})
    resize_shortest_edge: Optional[int] = field(
        default=None,
        metadata={"help": "Aspect-preserving resize (instead of --resize_height/--resize_width): each image is scaled "
                  "so that its shorter side has this length (portrait images stay portrait), as image processors' "
                  "shortest_edge and mmseg's keep_ratio do. Evaluation batches images of different sizes by "
                  "padding them."},
    )
    resize_longest_edge: Optional[int] = field(
        default=None,
        metadata={"help": "Aspect-preserving resize: the longer side is at most this length (alone, or as a cap on "
                  "--resize_shortest_edge)."},
    )
    crop_height: Optional[int] = field(default=None, metadata={"help": "Training crop height (default: resized height)."})
    crop_width: Optional[int] = field(default=None, metadata={"help": "Training crop width (default: resized width)."})
    min_scale: float = field(default=0.75, metadata={"help": "Random rescale range, lower bound."})
    max_scale: float = field(default=1.5, metadata={"help": "Random rescale range, upper bound."})
    hflip: bool = field(default=True, metadata={"help": "Random horizontal flip for training."})
    selection_holdout: Optional[str] = field(
        default=None,
        metadata={"help": "Glob on training image file names (e.g. '0006R0_*', one CamVid sequence): the matching "
                  "training images are held out of training and evaluated on instead of the validation split. A "
                  "selection split disjoint from training, for choosing defaults (local folders only)."},
    )
    eval_full_resolution: bool = field(
        default=True,
        metadata={"help": "Evaluate against labels at their original size (logits upsampled); otherwise "
                  "labels are resized (nearest) to the eval image size."},
    )
    decoded_cache: Optional[bool] = field(
        default=None,
        metadata={"help": "Decode and resize each split once into uint8 memory-mapped arrays "
                  "(c2vkd_hf/data/decoded.py) and augment tensors read from them, instead of decoding the files at "
                  "every step. Default: on for local folders and the synthetic set, off for datasets/Hub sources; "
                  "false turns it off."},
    )
    decoded_cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Root folder of the decoded-dataset cache, one sub-folder per split, data and "
                  "preprocessing (default: $C2VKD_HF_CACHE/decoded, else ~/.cache/c2vkd_hf/decoded)."},
    )


@dataclass
class DistillationArguments:
    """Teacher, student, method and loss constants (formulas: ``c2vkd_hf.losses``)."""

    student_name_or_path: str = field(
        default="segformer-b0",
        metadata={"help": "Hub id or folder of an AutoModelForSemanticSegmentation, or segformer-b0..b5 "
                  "(random init)."},
    )
    teacher_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Hub id or folder of a CNN AutoModelForSemanticSegmentation teacher, or "
                  "torchvision:ARCH[:CHECKPOINT] (e.g. torchvision:deeplabv3_resnet101:/path/ckpt.pth). Required "
                  "unless --method none; the offline default trains a small one when omitted."},
    )
    student_config_overrides: Optional[str] = field(
        default=None,
        metadata={"help": "JSON object of config fields for a named SegFormer size, e.g. "
                  "'{\"hidden_sizes\": [16, 32, 64, 128]}' (tiny students for tests)."},
    )
    method: str = field(default="c2vkd", metadata={"help": f"One of {', '.join(METHODS)}."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow Hub code for teacher/student."})

    # total loss weights
    ce_weight: float = field(default=1.0, metadata={"help": "Weight of cross-entropy on labels."})
    pdd_weight: float = field(default=1.0, metadata={"help": "C2VKD: weight of PDD."})
    glob_weight: float = field(
        default=0.1,
        metadata={"help": "C2VKD: weight of the VLFD global term (benchmarks/camvid/ABLATIONS.md: glob1)."})
    rel_weight: float = field(default=1.0, metadata={"help": "C2VKD: weight of the VLFD relation term."})
    ling_weight: float = field(default=1.0, metadata={"help": "C2VKD: weight of the VLFD linguistic term."})
    kd_weight: Optional[float] = field(
        default=None,
        metadata={"help": "Weight of the peer loss (kd/cwd/dist/dkd); default is each method's published recipe."},
    )

    # PDD / DKD
    pdd_alpha: float = field(default=1.0, metadata={"help": "PDD: weight of the target-class term TC."})
    pdd_beta: float = field(default=1.0, metadata={"help": "PDD: weight of the non-target term NC."})
    pdd_temperature: float = field(default=1.0, metadata={"help": "PDD: temperature T."})
    label_weight: float = field(default=0.5, metadata={"help": "PDD/linguistic label correction g in [0, 1]."})
    class_balance: bool = field(
        default=True,
        metadata={"help": "C2VKD: class-balanced means in PDD and the linguistic term, class k weighing n_k^(1 - p) "
                  "with p = --class_balance_power (n_k: the batch's pixels of class k; the cross-entropy keeps the "
                  "plain mean); false gives the paper's formulas (benchmarks/camvid/FINDINGS.md)."})
    class_balance_power: float = field(
        default=0.5,
        metadata={"help": "C2VKD with --class_balance: exponent p of the balancing, class k weighing n_k^(1 - p) "
                  "(1: every class present the same; 0: the plain mean)."})
    # VLFD
    feature_pairs: Optional[str] = field(
        default=None,
        metadata={"help": "Comma-separated student:teacher feature names (default: decoder:decoder, the "
                  "classifiers' inputs, when both models have one; otherwise the deepest stages)."},
    )
    glob_tau: float = field(default=1.0, metadata={"help": "VLFD global term: channel softmax temperature."})
    rel_grid: int = field(default=16, metadata={"help": "VLFD relation term: pooled grid size G."})
    ling_tau: float = field(default=0.03, metadata={"help": "VLFD linguistic term: pixel-text temperature."})
    stage_pairs: Optional[str] = field(
        default="auto",
        metadata={"help": "C2VKD stage guidance and exits: comma-separated student:teacher stage pairs (e.g. "
                  "stage1:stage1,stage2:stage2,stage3:stage3,stage4:stage4), each with its own 1x1 projector, or "
                  "'auto' (the two models' stages paired from the deepest down, as many as the model with fewer "
                  "has); their VLFD global + relation terms form the 'stage' term (--stage_weight > 0), their "
                  "exits the 'exit' term (--exit_weight > 0)."})
    stage_weight: float = field(default=0.0, metadata={"help": "C2VKD: weight of the stage-guidance term."})
    exit_weight: float = field(
        default=0.5,
        metadata={"help": "C2VKD: weight of the stage exits (OFA-KD's exits, Hao et al. NeurIPS 2023): each student "
                  "stage of --stage_pairs gets a 1x1 exit into the classes, taught the teacher's logits through PDD "
                  "(term 'exit', scheduled by --weight_schedules exit:..., by default decaying to 0 at half of "
                  "training); the exits are not part of the saved student. 0: off (the paper's C2VKD)."})
    channel_weight: float = field(
        default=3.0,
        metadata={"help": "C2VKD: weight of a channel-wise logit term (CWD's formula, each class map as a "
                  "distribution over positions) added to PDD (term 'channel', scheduled by --weight_schedules "
                  "channel:..., by default decaying to 0 at half of training); 0: off, the paper's C2VKD."})
    channel_tau: float = field(default=4.0, metadata={"help": "C2VKD: temperature of the channel-wise term (CWD's 4)."})
    weight_schedules: str = field(
        default="stage:linear:0.5,exit:linear:0.5,channel:linear:0.5",
        metadata={"help": "Loss-term weight schedules over training, term:kind[:end] comma-separated, kind "
                  "constant|linear|cosine, end = fraction of training where the weight reaches 0 (e.g. "
                  "'stage:linear:0.5,pdd:cosine:1'). Terms a method lacks are ignored."})
    text_head: Optional[bool] = field(
        default=None,
        metadata={"help": "Train the student's classifier as a text head (cosine classifier of a learned projection "
                  "of its 'decoder' feature against the class names' CLIP text embeddings), folded into its 1x1 "
                  "classifier at the end so the saved student stays plain. Works with every method (needs text "
                  "embeddings). Default: on for c2vkd when text embeddings are available, off otherwise."})

    # text embeddings
    text_embeddings: Optional[str] = field(
        default=None, metadata={"help": "Precomputed class-name embeddings [K, D] (.pth, .safetensors, .npy)."}
    )
    clip_model: Optional[str] = field(default=None, metadata={"help": "open_clip model name, e.g. ViT-B-16."})
    clip_pretrained: Optional[str] = field(
        default=None, metadata={"help": "open_clip pretrained tag or local checkpoint path."}
    )
    prompt_templates: str = field(
        default="ensemble", metadata={"help": "'ensemble' (standard ImageNet templates) or one template with {}."}
    )

    # peers (None: the published recipe)
    kd_temperature: Optional[float] = field(default=None, metadata={"help": "KD/CWD/DIST/DKD temperature."})

    # teacher-output cache (c2vkd_hf/cache/)
    teacher_cache: Optional[str] = field(
        default=None,
        metadata={"help": "Folder of a teacher-output cache: the teacher runs once over the training set (built "
                  "here first when missing, resumed when interrupted; scripts/cache_teacher.py builds it ahead) and "
                  "each step replays its stored logits/features under the step's crop, scale and flip instead of "
                  "running the teacher. A cache built for other teacher weights, images or preprocessing is "
                  "refused."})
    teacher_input_scale: float = field(
        default=1.0,
        metadata={"help": "The teacher sees each training view at this many times the student's resolution (e.g. 1.5 "
                  "for a teacher trained at 180x240 when the student reads 120x160): with --teacher_cache the "
                  "teacher runs on the source image resized to the data's reference size times this factor; "
                  "online it runs on the student's view upsampled bilinearly. The student and its inference "
                  "are unchanged."})
    teacher_cache_top_k: Optional[int] = field(
        default=None,
        metadata={"help": "Store only the k largest teacher logits per pixel (plus one rest logit) in the cache "
                  "(default: all logits)."})

    # teacher training (offline default / train_teacher.py)
    teacher_cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Offline default job: where its trained teacher is cached (default "
                                "<output_dir>/teacher)."})
    default_teacher_steps: int = field(
        default=150, metadata={"help": "Offline default job: training steps of its small teacher."})

    # the output folder
    retrain: bool = field(
        default=False,
        metadata={"help": "Train from scratch even when --output_dir holds a finished run of this configuration, or "
                  "another configuration's run: its results, checkpoints and run_config.json are deleted first. "
                  "Without it a finished run is not trained again, an interrupted one is resumed, and another "
                  "configuration's run is refused."})

    wait_for_lock: bool = field(
        default=False,
        metadata={"help": "When another run holds --output_dir (one writer per folder, c2vkd_hf/locks.py), wait for "
                  "it to end instead of stopping with exit 2."})

    # speed
    channels_last: bool = field(
        default=True,
        metadata={"help": "Keep the student's weights in the channels_last memory format (its convolutions run "
                  "faster, benchmarks/speed/RESULTS.md). Numerics differ from the contiguous format only by "
                  "rounding."})


def distillation_defaults() -> dict:
    """``{flag: default}`` of every :class:`DistillationArguments` field."""
    return {f.name: f.default for f in fields(DistillationArguments)}
