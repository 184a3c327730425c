"""c2vkd_hf: distil CNN segmentation teachers into ViT students (C2VKD, arXiv 2310.07265)."""

__version__ = "0.1.0"

from . import models  # noqa: E402,F401  registers the project's CNN teacher with the Auto classes
