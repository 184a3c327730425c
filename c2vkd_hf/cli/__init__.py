"""The console commands, one module each (``python -m c2vkd_hf.cli.distill`` works too):

* ``c2vkd-distill`` (:mod:`c2vkd_hf.cli.distill`): distil a CNN teacher into a ViT student;
* ``c2vkd-train-teacher`` (:mod:`c2vkd_hf.cli.train_teacher`): fine-tune a CNN teacher;
* ``c2vkd-evaluate`` (:mod:`c2vkd_hf.cli.evaluate`): mIoU of a saved model;
* ``c2vkd-text-query`` (:mod:`c2vkd_hf.cli.text_query`): text-query segmentation with a C2VKD student.

Each module has ``main(argv)`` (returns the results; raises on bad input) and ``run(argv)`` (the
command: one ``error: ...`` line and an exit code instead of a traceback). ``scripts/<name>.py``
are thin wrappers, so ``accelerate launch scripts/distill.py`` and ``accelerate launch -m
c2vkd_hf.cli.distill`` run the same code.
"""
