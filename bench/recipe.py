"""The recipe this project is measured against, as a baseline to run in the same process.

The common Gemma QLoRA recipe: nf4 base, LoRA r=64 on every linear layer, Hugging Face
``Trainer`` with micro-batch 1 x gradient accumulation 16, gradient checkpointing, sdpa
attention, bf16, fused AdamW, and the model's own loss (full-vocabulary logits at every position,
labels -100 outside the answer). Its evaluation calls ``generate`` with batch 8 and
``max_new_tokens=128``.

Both run on the model object they are given, so the recipe and the project's defaults are timed
on the very same weights, GPU and inputs.
"""

from __future__ import annotations

import time

RECIPE_MICRO_BATCH = 1
RECIPE_GRAD_ACCUM = 16
RECIPE_EVAL_BATCH = 8
RECIPE_MAX_NEW_TOKENS = 128


def sample_tensors(processor, images, answers, class_names) -> list[dict]:
    """One encoded sample per (image, answer) with the batch dimension dropped, for Trainer's
    default collator (micro-batch 1 needs no padding)."""
    from components import prompting

    samples = []
    for image, answer in zip(images, answers):
        batch = prompting.encode_training_batch(processor, [image], [answer], class_names)
        samples.append({k: v[0] for k, v in batch.items()})
    return samples


def clock(marks: list[float], cuda: bool, micro_batches: bool = True):
    """A Trainer callback appending the host clock (synchronised) to ``marks``: once at the start,
    then at the end of every micro-batch (``marks[i]``: end of micro-batch i), or with
    ``micro_batches=False`` of every optimizer step only: a sync per micro-batch stops the host
    from queueing the next one while the GPU runs, which slows small micro-batches down."""
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def _mark(self):
            if cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

        def on_step_begin(self, args, state, control, **kwargs):
            if not marks:
                self._mark()

        def on_substep_end(self, args, state, control, **kwargs):
            if micro_batches:
                self._mark()

        def on_step_end(self, args, state, control, **kwargs):
            self._mark()

    return Clock()


def train(peft_model, samples: list[dict], output_dir: str, *, max_steps: int, learning_rate: float,
          micro_batch_size: int = RECIPE_MICRO_BATCH, grad_accum_steps: int = RECIPE_GRAD_ACCUM,
          gradient_checkpointing: bool = True, max_grad_norm: float = 1.0, seed: int = 0) -> dict:
    """Train with ``transformers.Trainer`` as the recipe does; returns its per-step losses and the
    host clock (synchronised) at the end of each micro-batch, for timing."""
    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator

    cuda = next(peft_model.parameters()).device.type == "cuda"
    marks: list[float] = []
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=micro_batch_size,
        gradient_accumulation_steps=grad_accum_steps,
        max_steps=max_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=max_grad_norm,
        bf16=cuda,
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
    )
    trainer = Trainer(model=peft_model, args=args, train_dataset=samples,
                      data_collator=default_data_collator, callbacks=[clock(marks, cuda)])
    # Keep the data in the given order: the project's loop is compared step for step.
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(samples)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"losses": losses, "marks": marks}
