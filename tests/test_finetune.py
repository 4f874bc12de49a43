"""Fine-tune step on the tiny model: LoRA placement, clipping, checkpointing, resume, preemption, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components import finetune, modeling, prompting
from components.artifacts import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINT_STATE, DATASET_MANIFEST,
                                  TRAIN_METRICS)


def small_config(tiny_model_dir, small_pets_dir, output_dir, **overrides) -> finetune.FinetuneConfig:
    values = dict(model_dir=str(tiny_model_dir), dataset_dir=str(small_pets_dir), output_dir=str(output_dir),
                  lora_r=4, lora_alpha=8, learning_rate=5e-3, epochs=2, batch_size=4, micro_batch_size=2,
                  train_limit=12, save_every_steps=2, log_every_steps=1, seed=3)
    values.update(overrides)
    return finetune.FinetuneConfig(**values)


def peft_tiny(tiny_model_dir, r=4):
    from peft import LoraConfig, get_peft_model

    model = modeling.load_model(str(tiny_model_dir), torch.device("cpu"))
    targets = modeling.lora_target_modules(model)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)), targets


def test_lora_covers_every_linear_of_language_model_and_vision_tower(tiny_model_dir):
    model = modeling.load_model(str(tiny_model_dir), torch.device("cpu"))
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = set(modeling.lora_target_modules(model))
    language = {n for n in linears if n.startswith("model.language_model.")}
    vision = {n for n in linears if n.startswith("model.vision_tower.")}
    assert language and vision
    assert language <= targets and vision <= targets
    assert "lm_head" not in targets


def test_clipping_stays_around_the_adapted_layer(tiny_model_dir):
    from peft.tuners.lora import LoraLayer
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    model, _ = peft_tiny(tiny_model_dir)
    clipped = [m for n, m in model.named_modules() if isinstance(m, Gemma4ClippableLinear) and "vision_tower" in n]
    assert clipped
    module = clipped[0]
    assert isinstance(module.linear, LoraLayer), "LoRA must wrap the inner linear, inside the clamps"
    torch.nn.init.normal_(module.linear.lora_B["default"].weight, std=1.0)  # make the adapter matter
    x = torch.randn(3, 5, module.linear.in_features) * 10  # well past the input bounds (about +-2 to +-3)
    out = module(x)
    inner = module.linear(torch.clamp(x, module.input_min, module.input_max))
    expected = torch.clamp(inner, module.output_min, module.output_max)
    assert torch.equal(out, expected)
    assert (out.abs() == module.output_max).any(), "the output clamp should bind on this input"
    assert not torch.allclose(module.linear(x), out), "without the clamps the result would differ"
    # And the adapter really contributes inside the clamps.
    with model.disable_adapter():
        assert not torch.allclose(module(x), out)


def test_gradient_checkpointing_gives_the_same_gradients_on_kv_shared_layers(tiny_model_dir):
    from PIL import Image

    assert modeling.load_model(str(tiny_model_dir), torch.device("cpu")).config.text_config.num_kv_shared_layers > 0
    processor = modeling.load_processor(str(tiny_model_dir))
    batch = prompting.encode_training_batch(
        processor, [Image.new("RGB", (64, 64), (200, 10, 10)), Image.new("RGB", (96, 48), (10, 10, 200))],
        ["pug", "Bengal"], ["pug", "Bengal"])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, _ = peft_tiny(tiny_model_dir)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        if checkpointing:
            model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.get_base_model().enable_input_require_grads()
        model.train()
        for m in model.modules():  # dropout off: compare the arithmetic, not the masks
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        loss, n = finetune.answer_loss(model, dict(batch))
        (loss / n).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    no_ckpt, ckpt = grads
    shared_layer_grads = [k for k in no_ckpt if "language_model.layers.3." in k and "lora_A" in k]
    assert shared_layer_grads, "the last (KV-shared) layer must be adapted and get gradients"
    for k in no_ckpt:
        torch.testing.assert_close(ckpt[k], no_ckpt[k], rtol=1e-4, atol=1e-6)


def test_train_writes_adapter_processor_and_metrics(tiny_model_dir, small_pets_dir, tmp_path):
    metrics = finetune.run(small_config(tiny_model_dir, small_pets_dir, tmp_path / "adapter", epochs=1))
    out = tmp_path / "adapter"
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, "tokenizer.json", "chat_template.jinja", TRAIN_METRICS):
        assert (out / name).is_file(), name
    saved = json.loads((out / TRAIN_METRICS).read_text())
    assert saved["steps"] == 3 and saved["train_samples"] == 12
    # The adapter artifact holds the adapter and its processor files only; the checkpoints went
    # to their own folder beside it and were deleted once the adapter was written.
    assert not [p for p in out.rglob("*") if p.is_dir() or p.name in ("optimizer.pt", CHECKPOINT_STATE)]
    assert finetune.checkpoint_root(small_config(tiny_model_dir, small_pets_dir, out)) == tmp_path / "adapter.checkpoints"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert any("vision_tower" in m for m in saved["adapted_modules"])
    assert any("language_model" in m for m in saved["adapted_modules"])
    assert saved["hyperparameters"]["lora_r"] == 4
    assert metrics["final_loss"] == saved["final_loss"]
    assert {"loss", "lr", "samples_per_s", "peak_memory_mb"} <= set(saved["log"][0])
    # A rerun of a finished run does nothing and returns the same metrics.
    again = finetune.run(small_config(tiny_model_dir, small_pets_dir, out, epochs=1))
    assert again["final_loss"] == saved["final_loss"]


def test_resume_ends_with_the_same_adapter(tiny_model_dir, small_pets_dir, tmp_path, capsys):
    straight = tmp_path / "straight"
    finetune.run(small_config(tiny_model_dir, small_pets_dir, straight))
    resumed = tmp_path / "resumed"
    stopped = finetune.run(small_config(tiny_model_dir, small_pets_dir, resumed, stop_after_steps=3,
                                        checkpoint_dir=str(tmp_path / "ckpt")))
    assert stopped == {"stopped_at_step": 3, "total_steps": 6}
    assert not (resumed / ADAPTER_WEIGHTS).exists()
    assert finetune.latest_checkpoint(tmp_path / "ckpt").name == "checkpoint-3"
    # Another output folder (a retried task's new output URI), the same checkpoint folder: resumes.
    resumed = tmp_path / "resumed-retry"
    finetune.run(small_config(tiny_model_dir, small_pets_dir, resumed, checkpoint_dir=str(tmp_path / "ckpt")))
    assert f"resuming from {tmp_path / 'ckpt' / 'checkpoint-3'}" in capsys.readouterr().out
    assert not (tmp_path / "ckpt").exists()  # spent once the adapter is written
    a = load_file(straight / ADAPTER_WEIGHTS)
    b = load_file(resumed / ADAPTER_WEIGHTS)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    # The adapter moved away from its initialisation (lora_B starts at zero).
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)


def test_incomplete_checkpoint_is_ignored(tmp_path):
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir(parents=True)
        (tmp_path / f"checkpoint-{step}" / CHECKPOINT_STATE).write_text("{}")
    (tmp_path / "checkpoint-12").mkdir()  # cut off before its state file: not complete
    (tmp_path / "tmp-checkpoint-14").mkdir()
    assert finetune.latest_checkpoint(tmp_path).name == "checkpoint-10"  # by step, not by name


def test_checkpoints_inside_the_adapter_folder_are_refused(tiny_model_dir, small_pets_dir, tmp_path):
    with pytest.raises(ValueError, match="--checkpoint-dir .* is inside --output-dir"):
        finetune.run(small_config(tiny_model_dir, small_pets_dir, tmp_path / "o",
                                  checkpoint_dir=str(tmp_path / "o" / "checkpoints")))
    with pytest.raises(ValueError, match="--checkpoint-every-minutes must be >= 0"):
        small_config(tiny_model_dir, small_pets_dir, tmp_path / "o", checkpoint_every_minutes=-1)
    assert finetune.checkpoint_root(small_config(tiny_model_dir, small_pets_dir, "o", checkpoint_dir="gs://bkt/ck/1")) \
        == Path("/gcs/bkt/ck/1")


def test_resume_refuses_other_hyperparameters(tiny_model_dir, small_pets_dir, tmp_path):
    out = tmp_path / "run"
    finetune.run(small_config(tiny_model_dir, small_pets_dir, out, stop_after_steps=2))
    with pytest.raises(ValueError, match="other hyperparameters"):
        finetune.run(small_config(tiny_model_dir, small_pets_dir, out, learning_rate=1e-3))


def test_bad_input_fails_before_loading_the_model(tiny_model_dir, small_pets_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="--model-dir"):
        finetune.run(small_config(tmp_path / "nope", small_pets_dir, tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match=DATASET_MANIFEST):
        finetune.run(small_config(tiny_model_dir, tmp_path, tmp_path / "o"))
    with pytest.raises(ValueError, match="--lora-r"):
        small_config(tiny_model_dir, small_pets_dir, tmp_path / "o", lora_r=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--quantization nf4 needs a CUDA GPU"):
            finetune.run(small_config(tiny_model_dir, small_pets_dir, tmp_path / "o", quantization="nf4"))
    assert not (tmp_path / "o").exists()


def test_sigterm_exits_without_starting_a_checkpoint(tiny_model_dir, small_pets_dir, tmp_path, monkeypatch):
    """Cloud Run / Vertex kill a task about 10 s after SIGTERM, too soon for a multi-GB write: the
    step in flight finishes, no checkpoint is started, and the process exits non-zero; the retry
    resumes from the last periodic (here: by wall time, every step) checkpoint."""
    import os
    import signal

    real_loss, calls = finetune.answer_loss, []

    def loss_then_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives in the first micro-batch of step 3
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(finetune, "answer_loss", loss_then_sigterm)
    handler_before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    # Steps alone would never checkpoint (100); the clock does, after every step (1e-6 minutes).
    cfg = small_config(tiny_model_dir, small_pets_dir, out, save_every_steps=100, checkpoint_every_minutes=1e-6)
    with pytest.raises(SystemExit, match="SIGTERM after step 3: no new checkpoint started; a rerun resumes from"):
        finetune.run(cfg)
    root = finetune.checkpoint_root(cfg)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-1", "checkpoint-2"]  # nothing of step 3
    assert finetune.latest_checkpoint(root).name == "checkpoint-2"
    assert signal.getsignal(signal.SIGTERM) is handler_before and len(calls) == 6  # step 3 finished
    monkeypatch.setattr(finetune, "answer_loss", real_loss)
    metrics = finetune.run(cfg)
    assert metrics["steps"] == 6


# Runs the step in a child process whose checkpoint writer blocks inside the write of step 4,
# after the adapter and optimizer files and before the state file, and says so with a file.
BLOCK_IN_WRITE = """
import os, sys, time, torch
real_save = torch.save
def save(obj, path, *args, **kwargs):
    if str(path).endswith(os.path.join("checkpoint-4", "scheduler.pt")):
        open(os.environ["WRITING"], "w").close()
        time.sleep(3600)
    return real_save(obj, path, *args, **kwargs)
torch.save = save
from components import finetune
sys.exit(finetune.main(sys.argv[1:]))
"""


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(tiny_model_dir, small_pets_dir,
                                                                          tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    from components.cli import to_argv

    cfg = small_config(tiny_model_dir, small_pets_dir, tmp_path / "run", checkpoint_every_minutes=0)
    writing = tmp_path / "writing"
    child = subprocess.Popen([sys.executable, "-c", BLOCK_IN_WRITE, *to_argv(cfg)], env={**os.environ, "WRITING": str(writing)})
    try:
        deadline = time.monotonic() + 300
        while not writing.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert writing.exists(), "the child never reached the write of step 4"
        child.send_signal(signal.SIGKILL)  # no handler, no cleanup: the write is cut off where it is
    finally:
        child.kill()
        child.wait()
    root = finetune.checkpoint_root(cfg)
    cut_off = root / "checkpoint-4"
    assert (cut_off / ADAPTER_WEIGHTS).is_file() and not (cut_off / CHECKPOINT_STATE).exists()
    assert finetune.latest_checkpoint(root).name == "checkpoint-2"
    metrics = finetune.run(cfg)
    assert f"resuming from {root / 'checkpoint-2'}" in capsys.readouterr().out
    assert metrics["steps"] == 6 and not root.exists()


def test_memory_presets_come_from_the_gpus_memory(monkeypatch):
    from types import SimpleNamespace

    cfg = finetune.FinetuneConfig(model_dir="-", dataset_dir="-", output_dir="-")
    cuda = torch.device("cuda", 0)
    for gib, expected in ((141, ("fast", 16, 1)), (80, ("fast", 16, 1)), (48, ("40gb", 8, 1)), (24, ("24gb", 2, 1))):
        # what the CUDA runtime reports for an H200, an H100 80GB, an L40S and an L4, a little under nominal
        total = int((gib - 1.5) * 2**30)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, t=total: SimpleNamespace(total_memory=t))
        assert finetune.memory_plan(cfg, cuda) == expected, gib
    # Named presets and explicit flags win; the micro-batch always divides the step.
    assert finetune.memory_plan(dataclasses_replace(cfg, memory_preset="24gb"), cuda) == ("24gb", 2, 1)
    assert finetune.memory_plan(dataclasses_replace(cfg, micro_batch_size=4, gradient_checkpointing="every-2"),
                                cuda) == ("24gb", 4, 2)
    assert finetune.memory_plan(dataclasses_replace(cfg, batch_size=12), cuda)[1] == 2
    assert finetune.memory_plan(dataclasses_replace(cfg, batch_size=12, memory_preset="fast"), cuda)[1] == 4
    assert finetune.memory_plan(cfg, torch.device("cpu")) == ("cpu", 8, 0)
    with pytest.raises(ValueError, match="--micro-batch-size 5 must divide --batch-size 16"):
        dataclasses_replace(cfg, micro_batch_size=5)
    with pytest.raises(ValueError, match="--gradient-checkpointing must be one of"):
        dataclasses_replace(cfg, gradient_checkpointing="sometimes")


def test_a_step_splits_into_whole_micro_batches_on_every_process():
    """Trainer runs micro-batch x accumulation x processes samples per optimizer step: a step
    that does not split so is refused before any process starts; samples_before counts an
    epoch's short last step (30 samples in steps of 8: 8 + 8 + 8 + 6)."""
    from components.cli import UserError

    cfg = finetune.FinetuneConfig(model_dir="-", dataset_dir="-", output_dir="-", batch_size=6, micro_batch_size=2)
    assert finetune.memory_plan(cfg, torch.device("cpu"), 3) == ("cpu", 2, 0)
    with pytest.raises(UserError, match=r"--batch-size 6 must be a multiple of the micro-batch \(2\) times the "
                                        r"processes \(2\)"):
        finetune.memory_plan(cfg, torch.device("cpu"), 2)
    cfg = dataclasses_replace(cfg, batch_size=8, micro_batch_size=0)
    assert [finetune.samples_before(step, 30, cfg) for step in (0, 1, 3, 4, 5, 8)] == [0, 8, 24, 30, 38, 60]
    assert finetune.total_steps(30, cfg) == 3 * 4


def dataclasses_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_a_resume_may_change_the_micro_batch(tiny_model_dir, small_pets_dir, tmp_path, capsys):
    """A retry on another GPU type picks another memory preset: the step's samples and its
    normalisation do not change, so the run resumes instead of refusing."""
    out = tmp_path / "run"
    finetune.run(small_config(tiny_model_dir, small_pets_dir, out, stop_after_steps=2, micro_batch_size=2))
    metrics = finetune.run(small_config(tiny_model_dir, small_pets_dir, out, micro_batch_size=4))
    assert "resuming from" in capsys.readouterr().out
    assert metrics["steps"] == 6 and metrics["micro_batch_size"] == 4


@pytest.mark.slow
def test_two_processes_train_the_same_adapter_as_one(tiny_model_dir, small_pets_dir, tmp_path):
    """Data parallel on CPU (gloo): the step launches 2 torchrun workers itself; each takes half
    of every optimizer step's samples and the gradients are summed, so with the same global
    batch the adapter matches a 1-process run that takes each step whole (dropout off)."""
    common = dict(lora_dropout=0.0, device="cpu", batch_size=4, epochs=1, train_limit=12)
    one = finetune.run(small_config(tiny_model_dir, small_pets_dir, tmp_path / "one", num_processes=1,
                                    micro_batch_size=4, **common))
    two = finetune.run(small_config(tiny_model_dir, small_pets_dir, tmp_path / "two", num_processes=2,
                                    micro_batch_size=2, **common))
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    assert two["steps"] == one["steps"] == 3
    assert [e["loss"] for e in two["log"]] == pytest.approx([e["loss"] for e in one["log"]], rel=1e-4)
    a = load_file(tmp_path / "one" / ADAPTER_WEIGHTS)
    b = load_file(tmp_path / "two" / ADAPTER_WEIGHTS)
    moved = torch.cat([a[k].flatten() for k in a if "lora_B" in k]).norm()
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    print(f"1 vs 2 processes: losses {[round(e['loss'], 5) for e in one['log']]} vs "
          f"{[round(e['loss'], 5) for e in two['log']]}; adapter |diff| {diff:.2e} of |lora_B| {moved:.3f}")
    assert moved > 0 and diff < 1e-3 * moved, (diff, moved)


def test_process_count_is_checked_before_anything_runs(tiny_model_dir, small_pets_dir, tmp_path):
    with pytest.raises(ValueError, match="--num-processes must be >= 0"):
        small_config(tiny_model_dir, small_pets_dir, tmp_path / "o", num_processes=-1)


@pytest.mark.slow
def test_sigterm_reaches_the_workers_which_checkpoint_and_the_rerun_resumes(tiny_model_dir, small_pets_dir,
                                                                             tmp_path, capfd):
    """Cloud Run / Vertex signal only the container's first process: the step forwards SIGTERM to
    its workers, which agree on a step and exit; the parent exits non-zero, and the rerun resumes
    from the last complete checkpoint."""
    import os
    import signal
    import threading
    import time

    out = tmp_path / "run"
    cfg = small_config(tiny_model_dir, small_pets_dir, out, lora_dropout=0.0, device="cpu", batch_size=4,
                       micro_batch_size=2, epochs=8, train_limit=8, save_every_steps=1, num_processes=2)
    root = finetune.checkpoint_root(cfg)

    def signal_after_first_checkpoint():
        deadline = time.monotonic() + 240
        while finetune.latest_checkpoint(root) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=signal_after_first_checkpoint, daemon=True)
    killer.start()
    with pytest.raises(SystemExit, match="2 worker processes exited"):
        finetune.run(cfg)
    killer.join()
    stopped = finetune.latest_checkpoint(root)
    assert stopped is not None and not (out / TRAIN_METRICS).exists()
    assert int(stopped.name.split("-")[1]) < 16, "the workers should stop before the end"
    # Checkpoints carry every process's RNG state; a resume with another count re-seeds the rest.
    assert (stopped / "rng_state_0.pth").is_file() and (stopped / "rng_state_1.pth").is_file()
    capfd.readouterr()
    metrics = finetune.run(cfg)
    assert metrics["steps"] == 16
    assert f"resuming from {stopped}" in capfd.readouterr().out  # the workers print to the same stdout
