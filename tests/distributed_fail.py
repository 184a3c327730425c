"""Run by test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo on CPU): the tiny C2VKD setup where rank 1
meets a bad example at step 2 (a ``DataValidationError``), through :func:`c2vkd_hf.jobs.run_script` as the scripts
run; the other rank must not wait forever at the next collective."""

import sys

from transformers import TrainerCallback

from c2vkd_hf.data import DataValidationError
from c2vkd_hf.jobs import run_script
from tiny import c2vkd_model, make_trainer, tensor_dataset, tiny_student, tiny_teacher


class BadExampleOnRankOne(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if args.process_index == 1 and state.global_step == 2:
            raise DataValidationError("train/img7.png: label values [9] are outside the classes (rank 1 only)")


def main(argv):
    output_dir = argv[0]
    teacher = tiny_teacher()
    model = c2vkd_model(tiny_student(batch_norm=False), teacher)
    trainer = make_trainer(output_dir, model, teacher, tensor_dataset(16, seed=4), per_device_train_batch_size=2,
                           max_steps=50, optim="sgd", learning_rate=0.05, lr_scheduler_type="constant",
                           ddp_backend="gloo", dataloader_drop_last=True, ddp_timeout=60)
    trainer.add_callback(BadExampleOnRankOne())
    trainer.train()


if __name__ == "__main__":
    sys.exit(run_script(main, sys.argv[1:]))
