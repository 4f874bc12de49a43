"""The fine-tune step's trainer: ``transformers.Trainer`` with loss on the answer only, and the
step's own checkpoints (components/finetune.py: outside the adapter, on a background thread,
by steps and by wall time, in Trainer's checkpoint format), SIGTERM and --stop-after-steps.

Trainer runs the loop (micro-batches, gradient accumulation, data parallelism, bf16 autocast,
AdamW and the linear schedule, clipping, resume); this module only says what differs.
"""

from __future__ import annotations

import functools
import math
import time

from transformers import Trainer, TrainerCallback, TrainingArguments

from components import finetune, modeling, prompting

# Processes that decode and preprocess the next batches while the GPU trains (CUDA only: on the
# CPU they would compete with training for the same cores). Forked at the first batch, before the
# checkpoint thread exists, and kept for the whole run (docs/design.md, "Prefetching batches").
DATA_WORKERS = 2


def collate(processor, class_names, max_length, examples) -> dict:
    """A micro-batch of dataset examples as model inputs with answer-only labels."""
    return prompting.encode_training_batch(processor, [ex.image() for ex in examples],
                                           [ex.label_name for ex in examples], class_names, max_length=max_length)


def training_arguments(cfg: finetune.FinetuneConfig, plan: tuple[str, int, int], world_size: int, steps: int,
                       cuda: bool) -> TrainingArguments:
    _, micro, _ = plan
    return TrainingArguments(
        output_dir=str(finetune.checkpoint_root(cfg)), per_device_train_batch_size=micro,
        gradient_accumulation_steps=cfg.batch_size // (micro * world_size), max_steps=steps,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type="linear", warmup_steps=math.ceil(cfg.warmup_ratio * steps),
        # bf16 autocast on CUDA: PEFT keeps LoRA weights in fp32 (small updates are not rounded away),
        # whose matmuls would otherwise miss the bf16 tensor cores (docs/benchmarks.md#autocast).
        optim="adamw_torch_fused" if cuda else "adamw_torch", bf16=cuda, use_cpu=not cuda,
        seed=cfg.seed, data_seed=cfg.seed, logging_steps=cfg.log_every_steps,
        save_strategy="no",  # StepControl decides when; AnswerLossTrainer._save_checkpoint how
        report_to="none", remove_unused_columns=False, ddp_find_unused_parameters=False,
        # Its NaN check reads every micro-batch's loss on the host: a sync that stops the host from
        # queueing the next micro-batch while the GPU runs (docs/benchmarks.md, round 5).
        logging_nan_inf_filter=False,
        activation_checkpointing=False,  # attach_lora switched recomputation on, every n-th layer
        dataloader_num_workers=DATA_WORKERS if cuda else 0, dataloader_persistent_workers=cuda,
        dataloader_pin_memory=cuda,
    )


def make_trainer(cfg: finetune.FinetuneConfig, peft_model, processor, examples, class_names, plan, world_size: int,
                 callbacks=()) -> AnswerLossTrainer:
    """The Trainer of ``cfg`` for ``peft_model`` on ``examples`` (objects with ``image()`` and
    ``label_name``), split as ``plan`` (finetune.memory_plan) says."""
    cuda = next(peft_model.parameters()).device.type == "cuda"
    args = training_arguments(cfg, plan, world_size, finetune.total_steps(len(examples), cfg), cuda)
    control = StepControl(cfg, len(examples))
    return AnswerLossTrainer(model=peft_model, args=args, train_dataset=examples, processing_class=processor,
                             data_collator=functools.partial(collate, processor, list(class_names), cfg.max_length),
                             callbacks=[control, *callbacks], step_control=control,
                             hyperparameters=cfg.hyperparameters())


class AnswerLossTrainer(Trainer):
    # compute_loss divides by the answer tokens of the whole optimizer step, so Trainer must not
    # divide by the accumulation steps again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, step_control: StepControl, hyperparameters: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_control, self.hyperparameters = step_control, hyperparameters
        self.model_accepts_loss_kwargs = True  # makes Trainer count the step's answer tokens (num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs["pixel_values"] = inputs["pixel_values"].to(modeling.compute_dtype(self.args.device))
        loss_sum, count = finetune.answer_loss(model, inputs)
        # Per answer token of the whole optimizer step on all processes, so the gradient is the same
        # however the step is split; times the processes because data parallelism averages gradients.
        loss = loss_sum / (count if num_items_in_batch is None else num_items_in_batch) * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:
            logs = {**logs, "samples_per_s": self.step_control.samples_per_s(self.state),
                    "peak_memory_mb": finetune.peak_memory_mb(self.args.device)}
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer calls this when ``control.should_save``: the step's own checkpoint, copied to host
        memory here and written on the background thread, instead of Trainer's blocking write."""
        rngs = finetune.all_gather_objects(finetune.rng_state(self.args.world_size > 1))
        if self.is_world_process_zero():
            snap = finetune.snapshot(self.model, self.optimizer, self.lr_scheduler, self.state, rngs,
                                     self.hyperparameters)
            self.step_control.writer.submit(snap)

    def say(self, message: str) -> None:
        if self.is_world_process_zero():
            print(message, flush=True)


class StepControl(TrainerCallback):
    """After each optimizer step: checkpoint every --save-every-steps or when
    --checkpoint-every-minutes passed, stop at --stop-after-steps, exit on SIGTERM."""

    def __init__(self, cfg: finetune.FinetuneConfig, num_samples: int):
        self.cfg, self.num_samples = cfg, num_samples
        self.writer = finetune.CheckpointWriter(finetune.checkpoint_root(cfg), cfg.keep_checkpoints)
        self.preempted = self.stopped = False
        self.started = self.last_saved = time.monotonic()
        self.first_step = 0

    def preempt(self) -> None:
        self.preempted = True

    def samples_per_s(self, state) -> float:
        """Samples per second over this process's run (a resumed run counts from where it resumed)."""
        done = (finetune.samples_before(state.global_step, self.num_samples, self.cfg)
                - finetune.samples_before(self.first_step, self.num_samples, self.cfg))
        return done / max(time.monotonic() - self.started, 1e-9)

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.last_saved = time.monotonic()
        self.first_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        cfg, step = self.cfg, state.global_step
        finished = step >= state.max_steps
        stopping = cfg.stop_after_steps is not None and step >= cfg.stop_after_steps and not finished
        due = (step % cfg.save_every_steps == 0 or stopping
               or 0 < cfg.checkpoint_every_minutes * 60 <= time.monotonic() - self.last_saved)
        # Cloud Run and Vertex stop a task with SIGTERM and kill it about 10 s later: exit after
        # this step without starting a (multi-GB) checkpoint write; the retry resumes.
        preempt_now, save_now = finetune.agree(self.preempted, due and not finished, args.device)
        if preempt_now and not finished:
            done = self.writer.wait(finetune.PREEMPT_WAIT_S)  # a write in flight may finish; none is started
            raise SystemExit(f"SIGTERM after step {step}: no new checkpoint started"
                             f"{'' if done else ' (the one in flight is left incomplete)'}; a rerun resumes "
                             f"from {finetune.latest_checkpoint(self.writer.root)}")
        control.should_save = save_now
        control.should_log = control.should_log or finished  # the last step's loss is the run's final loss
        if stopping:
            self.stopped = control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.last_saved = time.monotonic()
