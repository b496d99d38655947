"""Checkpointing a :class:`.streaming.PackedStream` with the HF Trainer: its position goes into every checkpoint, and
a resumed run continues the stream from there (docs/data.md, "Resume"). Kept apart from :mod:`.streaming` so that
importing the data package does not import the Trainer stack.
"""
from __future__ import annotations

import os

from transformers import TrainerCallback

from .streaming import PackedStream


class StreamStateCallback(TrainerCallback):
    """Writes the stream position of this rank into every checkpoint (``stream_state-rank<r>.json``)."""

    def __init__(self, stream: PackedStream):
        self.stream = stream

    def on_save(self, args, state, control, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self.stream.save_state(checkpoint, consumed_batches=state.global_step * args.gradient_accumulation_steps,
                               batch_size=args.per_device_train_batch_size, num_workers=args.dataloader_num_workers)


def attach_stream(trainer, stream: PackedStream, resume_from_checkpoint=None) -> None:
    """Make ``trainer`` checkpoint the stream position and, when it resumes, continue the stream from there.

    ``resume_from_checkpoint`` defaults to ``trainer.args.resume_from_checkpoint`` (a path, or True for the last
    checkpoint in ``output_dir``). With ``--ignore_data_skip`` the stream restarts from its beginning, as HF does.
    """
    from transformers.trainer_utils import get_last_checkpoint

    args = trainer.args
    trainer.add_callback(StreamStateCallback(stream))
    checkpoint = resume_from_checkpoint if resume_from_checkpoint is not None else args.resume_from_checkpoint
    if checkpoint is True or (isinstance(checkpoint, str) and checkpoint.lower() == "true"):
        checkpoint = get_last_checkpoint(args.output_dir)
        if checkpoint is None:
            raise ValueError(f"--resume_from_checkpoint: no checkpoint found in {args.output_dir}")
    if checkpoint and not args.ignore_data_skip:
        stream.load_state(checkpoint, batch_size=args.per_device_train_batch_size,
                          num_workers=args.dataloader_num_workers)
