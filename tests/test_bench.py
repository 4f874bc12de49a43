"""The benchmark harness (bench/): real-size configs, the recipe baseline, and a CPU smoke run.

The GPU numbers come from device runs (docs/benchmarks.md); these tests keep the harness honest:
the configs are the published sizes, the recipe loop computes the same training as the project's
loop, and the harness runs end to end on the tiny model.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench import bench_gpu, real_size, recipe
from components import finetune, modeling, random_model

PUBLISHED_BILLIONS = {"gemma-4-e2b": 5.10, "gemma-4-e4b": 7.94, "gemma-4-31b": 31.27, "gemma-4-26b-a4b": 25.81}


@pytest.mark.parametrize("variant", sorted(PUBLISHED_BILLIONS))
def test_variant_configs_build_the_published_sizes(variant):
    from transformers import Gemma4ForConditionalGeneration

    processor = random_model.stand_in_processor(variant)
    config = random_model.variant_config(variant, processor.tokenizer)
    with torch.device("meta"):  # shapes only: no 62 GB of weights on this machine
        model = Gemma4ForConditionalGeneration(config)
    counts = real_size.parameter_counts(model)
    assert sum(counts.values()) / 1e9 == pytest.approx(PUBLISHED_BILLIONS[variant], abs=0.01)
    if variant == "gemma-4-31b":
        # The recipe's "all 601 linear layers": language model, vision tower, vision projection.
        assert len(modeling.lora_target_modules(model)) == 601
        assert config.text_config.layer_types.count("full_attention") == 10


def test_unknown_variant_is_named():
    processor = random_model.stand_in_processor("gemma-4-e2b")
    with pytest.raises(ValueError, match="--variant 'gemma-4-7b'"):
        random_model.variant_config("gemma-4-7b", processor.tokenizer)


def test_bench_samples_are_shaped_like_the_real_task():
    from components import evaluate, prompting
    from components.prepare_dataset import OXFORD_PET_CLASSES

    processor = random_model.stand_in_processor("gemma-4-31b")
    photos = bench_gpu.random_photos(2, seed=0)
    batch = prompting.encode_training_batch(processor, photos, ["pug", "american_pit_bull_terrier"],
                                            list(OXFORD_PET_CLASSES))
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image|>")
    assert (batch["input_ids"] == image_token).sum(1).tolist() == [266, 266]  # a 500x375 photo at 280 max
    assert 500 <= int(batch["attention_mask"].sum(1).max()) <= 530  # the recipe's 514-token samples
    candidates = evaluate.answer_token_ids(processor, list(OXFORD_PET_CLASSES))
    assert 5 <= max(map(len, candidates)) <= 12


def test_recipe_trainer_and_project_loop_train_the_same(tiny_model_dir, tmp_path):
    """Same rank, targets, effective batch and data: HF Trainer at micro-batch 1 x 4 and the
    project's loop at micro-batch 2 x 2 give the same losses and (nearly) the same adapter."""
    from PIL import Image

    processor = modeling.load_processor(str(tiny_model_dir))
    names = ["pug", "Bengal", "beagle", "Persian"]
    generator = torch.Generator().manual_seed(0)
    images = [Image.new("RGB", (64 + 8 * i, 64), tuple(torch.randint(0, 256, (3,), generator=generator).tolist()))
              for i in range(8)]
    answers = [names[i % 4] for i in range(8)]
    cfg = finetune.FinetuneConfig(model_dir="-", dataset_dir="-", output_dir="-", lora_r=4, lora_alpha=8,
                                  lora_dropout=0.0, learning_rate=5e-3, batch_size=4)

    def fresh():
        model = modeling.load_model(str(tiny_model_dir), torch.device("cpu"))
        torch.manual_seed(1)
        return finetune.attach_lora(model, cfg, 0)[0]

    ours = fresh()
    trainable = [p for p in ours.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    samples = [bench_gpu.Sample(image, answer) for image, answer in zip(images, answers)]
    our_losses = [
        finetune.train_step(ours.get_base_model(),
                            finetune.encode_step(processor, [samples[s:s + 2], samples[s + 2:s + 4]], names, cfg),
                            torch.device("cpu"), optimizer, scheduler, trainable, cfg.max_grad_norm)
        for s in (0, 4)
    ]
    theirs = fresh()
    start = {n: p.detach().clone() for n, p in theirs.named_parameters() if p.requires_grad}
    result = recipe.train(theirs, recipe.sample_tensors(processor, images, answers, names), str(tmp_path),
                          max_steps=2, learning_rate=cfg.learning_rate, grad_accum_steps=4,
                          gradient_checkpointing=False)
    assert result["losses"] == pytest.approx(our_losses, rel=1e-4)
    assert len(result["marks"]) == 1 + 8  # a start mark and one per micro-batch, for timing
    ours_p = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    theirs_p = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    moved = torch.cat([(theirs_p[n].detach() - start[n]).flatten() for n in start]).norm()
    diff = torch.cat([(theirs_p[n].detach() - ours_p[n].detach()).flatten() for n in start]).norm()
    print(f"adapter: moved {moved:.4f}, recipe vs project {diff:.5f}")
    # Adam's nearly sign-like first steps amplify rounding differences of tiny gradients a little.
    assert moved > 1e-2 and diff < 0.01 * moved


def test_harness_runs_every_row_on_the_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    """Every row kind the GPU run makes (bf16 base, recipe, default, each preset, each lever, each
    evaluation row) runs on CPU, so no row can break unnoticed until device time is spent."""
    monkeypatch.setattr(recipe, "RECIPE_MAX_NEW_TOKENS", 8)  # the row's code, not its 128 tokens of CPU time
    out = tmp_path / "bench.json"
    result = bench_gpu.run(bench_gpu.BenchConfig(
        output=str(out), model_dir=str(tiny_model_dir), device="cpu", batch_size=8, timed_steps=1,
        recipe_micro_batches=3, eval_batch_sizes="2", eval_batches=1, bf16_base=True))
    saved = json.loads(out.read_text())
    rows = {r["row"]: r for r in saved["rows"]}
    expected = {"bf16 base, micro-batch 2, no recompute", "bf16 base, micro-batch 4, no recompute",
                "generate, bf16 base", "score, bf16 base", "recipe", "project default",
                *(f"preset {p}" for p in bench_gpu.PRESET_CARDS_GIB), "lever: default without fused norms",
                "lever: micro-batch 8, recompute every-2", "lever: micro-batch 4, recompute off",
                "recipe generate", "recipe generate, 128 tokens",
                *(f"project {mode} ({size})" for mode in ("generate", "score") for size in ("default", "batch 2"))}
    assert set(rows) == expected and len(saved["rows"]) == len(expected)
    assert [name for name, r in rows.items() if "error" in r] == []
    assert rows["recipe"]["loop"] == "transformers.Trainer" and rows["project default"]["loop"] == "project"
    assert rows["project default"]["lora_layers"] == rows["recipe"]["lora_layers"]
    assert rows["preset 24gb"]["lora_r"] == 16 and rows["preset fast"]["lora_r"] == 64  # the 24 GB preset's rank
    assert rows["lever: micro-batch 4, recompute off"]["micro_batch_size"] == 4
    assert saved["summary"]["train_speedup"]["recipe"] == pytest.approx(1.0)
    assert result["summary"]["recipe_job_minutes"] > 0
    assert "| recipe (none) | transformers.Trainer |" in bench_gpu.render_markdown(saved)


@pytest.mark.parametrize("flags, message", [
    (["--variant", "gemma-4-31b", "--model-dir", "x"], "exactly one of --variant and --model-dir"),
    (["--variant", "gemma-4-31b", "--presets", "fast,48gb"], "--presets: unknown 48gb"),
    (["--variant", "gemma-4-31b", "--eval-batch-sizes", "8,x"], "--eval-batch-sizes"),
    (["--variant", "gemma-4-31b", "--device", "cpu"], "needs a CUDA GPU"),
])
def test_bad_flags_are_named(flags, message, tmp_path, capsys):
    assert bench_gpu.main(["--output", str(tmp_path / "x.json"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


def test_scaling_harness_runs_one_and_two_processes(tiny_model_dir, tmp_path):
    """The multi-GPU measurement (issue 6) as 2 CPU processes over gloo: both counts run through
    torchrun, every process ends with the same adapter, and an efficiency comes out."""
    from bench import bench_scaling

    out = tmp_path / "scaling.json"
    result = bench_scaling.run(bench_scaling.ScalingConfig(
        output=str(out), model_dir=str(tiny_model_dir), device="cpu", processes="1,2", per_process_batch=2,
        timed_steps=1, lora_r=4))
    assert json.loads(out.read_text()) == result
    rows = {r["processes"]: r for r in result["rows"]}
    assert set(rows) == {1, 2} and all("error" not in r for r in rows.values())
    assert rows[2]["timed_samples"] == 2 * rows[1]["timed_samples"]  # weak scaling: the global batch grows
    assert rows[1]["adapters_in_sync"] and rows[2]["adapters_in_sync"]
    assert set(result["efficiency"]) == {"1", "2"} and result["efficiency"]["1"] == pytest.approx(1.0)


def test_scaling_flags_are_checked(tmp_path, capsys):
    from bench import bench_scaling

    assert bench_scaling.main(["--output", str(tmp_path / "s.json"), "--model-dir", "x", "--processes", "2,1"]) == 2
    assert "error: --processes '2,1': start with 1" in capsys.readouterr().err
