"""The peer a user would pick: TRL's ``SFTTrainer``, set up as a careful user would, on the
project's own sequences, to run in the same process as the project's loop (issue 16).

Settings: per-device batch 16 (or the largest divisor of the step that fits), gradient
checkpointing (non-reentrant), bf16, fused AdamW, TRL's fused LM head (log-probabilities in tiles,
no [batch, seq, vocab] logits), Liger's layer kernels when ``liger-kernel`` is installed (CUDA),
and batches preprocessed in DataLoader worker processes. Loss only on the answer and its
``<turn|>``: the collator is ``prompting.encode_training_batch`` itself, whose labels are -100 on
the prompt, so TRL trains on exactly the project's loss tokens (``tests/test_bench.py`` checks the
losses against the project's loop). TRL's own vision collator renders a past model turn from the
chat template, which differs from the served prompt (``components/prompting.py`` says why).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys


def liger_available() -> bool:
    """Liger's kernels are Triton kernels: CUDA only, and only when the package is installed."""
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


@contextlib.contextmanager
def patches_undone(model):
    """Undo, on exit, what a trainer patched in place: Liger's instance ``forward``s and class
    renames, the names it rebinds in ``modeling_gemma4``, TRL's fused-LM-head ``forward``. The bench
    times other rows on the same model afterwards, which must run the model's own modules."""
    modules = list(model.modules())
    forwards = [module.__dict__.get("forward") for module in modules]
    class_names = {cls: cls.__name__ for cls in {type(m) for m in modules}}
    namespaces = [m for name, m in list(sys.modules.items()) if name.startswith("transformers.models.gemma4.")]
    saved = [(ns, dict(vars(ns))) for ns in namespaces]
    try:
        yield
    finally:
        for module, forward in zip(modules, forwards):
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
        for cls, name in class_names.items():
            cls.__name__ = name
        for ns, names in saved:
            vars(ns).update(names)


def collator(processor, images, answers, class_names):
    """Batches with labels from the project's own encoding, for dataset rows that hold an index
    into ``images`` / ``answers`` (in memory, as the bench's other rows have them)."""
    from functools import partial

    return partial(_collate, processor, list(images), list(answers), list(class_names))


def _collate(processor, images, answers, class_names, rows):
    from components import prompting

    picked = [row["index"] for row in rows]
    return prompting.encode_training_batch(processor, [images[i] for i in picked], [answers[i] for i in picked],
                                           class_names)


def train(peft_model, processor, images, answers, class_names, output_dir: str, *, max_steps: int,
          learning_rate: float, micro_batch_size: int, grad_accum_steps: int, liger: bool, workers: int,
          max_grad_norm: float = 1.0, seed: int = 0) -> dict:
    """Train with ``trl.SFTTrainer`` on (image, answer) pairs in the given order; returns per-step
    losses and the host clock at the end of each optimizer step (``recipe.clock``)."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from bench import recipe

    cuda = next(peft_model.parameters()).device.type == "cuda"
    marks: list[float] = []
    args = SFTConfig(
        output_dir=output_dir, per_device_train_batch_size=micro_batch_size,
        gradient_accumulation_steps=grad_accum_steps, max_steps=max_steps, learning_rate=learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=max_grad_norm,
        bf16=cuda, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        optim="adamw_torch_fused" if cuda else "adamw_torch", use_liger_kernel=liger,
        max_length=None, packing=False, padding_free=False, dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False, dataloader_num_workers=workers, logging_steps=1, save_strategy="no",
        report_to=[], seed=seed, data_seed=seed, disable_tqdm=True,
    )
    examples = Dataset.from_dict({"index": list(range(len(images)))})
    with patches_undone(peft_model):
        trainer = SFTTrainer(model=peft_model, args=args, train_dataset=examples, processing_class=processor,
                             data_collator=collator(processor, images, answers, class_names),
                             callbacks=[recipe.clock(marks, cuda, micro_batches=False)])
        # Keep the data in the given order: the project's loop is compared step for step.
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(examples)
        try:
            trainer.train()
        finally:
            losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
            trainer.accelerator.free_memory()
            del trainer
    return {"losses": losses, "marks": marks}
