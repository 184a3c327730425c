"""Constants shared by every layer of the package, in a module that imports nothing from it (so any
module can use them without an import cycle).

File names of checkpoints and models are transformers' own (``transformers.utils.SAFE_WEIGHTS_NAME``,
``transformers.trainer.TRAINER_STATE_NAME``, ...), not repeated here.
"""

#: The one internal label value meaning "ignore this pixel": a dataset's own void value is mapped to it
#: when the data is loaded, losses and metrics skip it, and the student's config carries it as
#: ``semantic_loss_ignore_index``.
IGNORE_INDEX = 255

__all__ = ["IGNORE_INDEX"]
