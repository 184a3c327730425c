"""Trains the tiny C2VKD setup for a few steps and saves the student; run by test_distributed.py under
``torchrun --nproc_per_node N`` (gloo on CPU) with the same global batch for every N."""

import gc
import os
import sys

import torch

from c2vkd_hf.jobs import end_distributed
from tiny import c2vkd_model, make_trainer, tensor_dataset, tiny_student, tiny_teacher

if __name__ == "__main__":
    output_dir, per_device = sys.argv[1], int(sys.argv[2])
    teacher = tiny_teacher()
    model = c2vkd_model(tiny_student(batch_norm=False), teacher)
    trainer = make_trainer(output_dir, model, teacher, tensor_dataset(16, seed=4), per_device_train_batch_size=per_device,
                           max_steps=3, optim="sgd", learning_rate=0.05, lr_scheduler_type="constant",
                           ddp_backend="gloo", dataloader_drop_last=True)
    trainer.train()
    if trainer.is_world_process_zero():
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, f"{output_dir}/weights.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 has saved
    del trainer, model  # the DDP wrapper holds the process group: let it go before the group is shut down
    gc.collect()
    end_distributed()
    # Skip interpreter teardown: it is torch's, not ours, and a gloo rank has aborted in it (SIGABRT).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
