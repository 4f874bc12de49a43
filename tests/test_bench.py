"""The benchmark harness (bench/): real-size configs, the recipe baseline, and a CPU smoke run.

The GPU numbers come from device runs (docs/benchmarks.md); these tests keep the harness honest:
the configs are the published sizes, the recipe loop computes the same training as the project's
loop, and the harness runs end to end on the tiny model.
"""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch

from bench import bench_gpu, fused_lora, real_size, recipe
from components import answer_trainer, finetune, modeling, random_model

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


def _two_step_setup(tiny_model_dir):
    """Class names, 8 images and answers, a fine-tune config and a fresh LoRA model maker, shared
    by the tests that compare a Trainer loop with the project's over 2 steps of 4 samples."""
    from PIL import Image

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

    return names, images, answers, cfg, fresh


def _project_losses(model, processor, samples, names, cfg, out) -> list[float]:
    """The fine-tune step's Trainer over 2 steps of 4 samples in the given order, each split into
    micro-batches of 2, at a constant learning rate (as the recipe and TRL rows)."""
    ft = dataclasses.replace(cfg, output_dir=str(out / "adapter"), max_steps=2, warmup_ratio=0.0, log_every_steps=1)
    trainer = answer_trainer.make_trainer(ft, model, processor, samples, names, ("cpu", 2, 0), world_size=1)
    trainer.args.lr_scheduler_type = "constant"
    trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(samples)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_recipe_trainer_and_project_loop_train_the_same(tiny_model_dir, tmp_path):
    """Same rank, targets, effective batch and data: the recipe's Trainer at micro-batch 1 x 4
    (full logits, the model's own loss) and the step's Trainer at micro-batch 2 x 2 (answer
    logits only, normalised per optimizer step) give the same losses and (nearly) the same adapter."""
    processor = modeling.load_processor(str(tiny_model_dir))
    names, images, answers, cfg, fresh = _two_step_setup(tiny_model_dir)
    ours = fresh()
    samples = [bench_gpu.Sample(image, answer) for image, answer in zip(images, answers)]
    our_losses = _project_losses(ours, processor, samples, names, cfg, tmp_path)
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


def test_trl_peer_trains_on_the_project_loss_tokens(tiny_model_dir, tmp_path):
    """TRL's SFTTrainer as the bench sets it up (per-device batch 4 x 1, the project's collator,
    TRL's fused LM head) gives the project loop's losses (micro-batch 2 x 2): the same loss tokens,
    normalised per optimizer step; and it leaves the model's own forward in place afterwards."""
    from bench import trl_peer
    from components import prompting

    processor = modeling.load_processor(str(tiny_model_dir))
    names, images, answers, cfg, fresh = _two_step_setup(tiny_model_dir)
    ours = fresh()
    samples = [bench_gpu.Sample(image, answer) for image, answer in zip(images, answers)]
    our_losses = _project_losses(ours, processor, samples, names, cfg, tmp_path)
    batch = trl_peer.collator(processor, images, answers, names)([{"index": i} for i in range(4)])
    expected = prompting.encode_training_batch(processor, images[:4], answers[:4], names)["labels"]
    assert torch.equal(batch["labels"], expected)  # -100 on the prompt: loss on answer + <turn|> only
    theirs = fresh()
    result = trl_peer.train(theirs, processor, images, answers, names, str(tmp_path), max_steps=2,
                            learning_rate=cfg.learning_rate, micro_batch_size=4, grad_accum_steps=1, liger=False,
                            workers=0)
    assert result["losses"] == pytest.approx(our_losses, rel=1e-4)
    assert len(result["marks"]) == 1 + 2
    assert "forward" not in theirs.get_base_model().__dict__  # TRL's fused-head forward undone


def test_patches_undone_restores_instance_forwards_and_module_names(tiny_model_dir):
    """What Liger does to a model in place (GPU only, so not run here): instance forwards, a class
    renamed, names in modeling_gemma4 rebound; the bench's other rows need them back."""
    from transformers.models.gemma4 import modeling_gemma4

    from bench import trl_peer

    model = modeling.load_model(str(tiny_model_dir), torch.device("cpu"))
    norm = next(m for m in model.modules() if isinstance(m, modeling_gemma4.Gemma4RMSNorm))
    cls, original = modeling_gemma4.Gemma4RMSNorm, modeling_gemma4.Gemma4RMSNorm.__name__
    with trl_peer.patches_undone(model):
        norm.forward = lambda x: x
        cls.__name__ = "LigerRMSNorm"
        modeling_gemma4.Gemma4RMSNorm = object
    assert "forward" not in norm.__dict__ and cls.__name__ == original and modeling_gemma4.Gemma4RMSNorm is cls


def test_repeats_are_interleaved_and_reported_as_medians():
    """Round r runs every row once, in order; a row's rate is the median of its repeats, with
    min, max and (max - min) / median; a row that fails is not run again and reports the error."""
    calls = []
    rates = {"a": iter([1.0, 3.0, 2.0]), "b": iter([10.0, 10.0, 16.0])}

    def measure(row_id):
        def fn(model, ctx):
            calls.append(row_id)
            if row_id == "c":
                return model, {"row": row_id, "kind": "train", "error": "out of memory: x"}
            rate = next(rates[row_id])
            return model, {"row": row_id, "kind": "train", "samples_per_s": rate, "seconds": 16 / rate, "peak_gib": rate}
        return fn

    specs = [bench_gpu.RowSpec(i, ("train",), measure(i), "train", 16, "-", "project") for i in "abc"]
    rounds = []
    bench_gpu.run_rounds(specs, "model", types.SimpleNamespace(device=torch.device("cpu")), 3, lambda rows, r: rounds.append((r, rows)))
    assert calls == ["a", "b", "c", "a", "b", "a", "b"]
    final = {row["id"]: row for row in rounds[-1][1]}
    assert [r for r, _ in rounds] == [0, 1, 2]
    assert final["a"]["samples_per_s"] == 2.0 and final["a"]["spread"] == {"min": 1.0, "max": 3.0, "relative": 1.0}
    assert final["b"]["samples_per_s"] == 10.0 and final["b"]["spread"]["relative"] == pytest.approx(0.6)
    assert final["a"]["seconds"] == 8.0 and final["a"]["peak_gib"] == 3.0 and len(final["a"]["repeats"]) == 3
    assert final["c"]["error"].startswith("out of memory") and "samples_per_s" not in final["c"]


def test_gpu_clock_samples_are_summarized_and_unreadable_fields_skipped():
    lines = ["1980, 41, 402.50, 0x0000000000000000", "1755, 47, [N/A], 0x0000000000000004",
             "1980, 45, 398.10, 0x0000000000000001", "Field \"clocks.sm\" is not a valid field to query.", ""]
    summary = bench_gpu.summarize_clocks(lines)
    assert summary == {"gpu_samples": 3, "sm_mhz_median": 1980.0, "sm_mhz_min": 1755.0, "temperature_c_max": 47.0,
                       "power_w_median": 400.3, "clock_event_reasons": ["0x0000000000000001", "0x0000000000000004"]}
    assert bench_gpu.summarize_clocks(["[N/A], [N/A], [N/A], [N/A]"]) == {}
    with bench_gpu.GpuClocks(torch.device("cpu")) as clocks:  # no card: nothing sampled
        pass
    assert clocks.summary == {} and clocks.process is None


def test_presets_come_from_the_medians_and_the_card_memory():
    rows = {
        "default": {"id": "default", "kind": "train", "loop": "project", "phase": "main", "lora_r": 64,
                    "samples_per_s": 3.0, "peak_reserved_gib": 41.0, "micro_batch_size": 16, "recompute_every": 1},
        "keep": {"id": "keep", "kind": "train", "loop": "project", "phase": "main", "lora_r": 64,
                 "samples_per_s": 3.3, "peak_reserved_gib": 110.0, "micro_batch_size": 4, "recompute_every": 0},
        "40": {"id": "40", "kind": "train", "loop": "project", "phase": "main", "lora_r": 64,
               "samples_per_s": 2.8, "peak_reserved_gib": 32.0, "micro_batch_size": 8, "recompute_every": 1},
        "24": {"id": "24", "kind": "train", "loop": "project", "phase": "main", "lora_r": 16,
               "samples_per_s": 1.3, "peak_reserved_gib": 21.0, "micro_batch_size": 2, "recompute_every": 1},
        "bf16": {"id": "bf16", "kind": "train", "loop": "project", "phase": "bf16", "lora_r": 64,
                 "samples_per_s": 9.0, "peak_reserved_gib": 30.0, "micro_batch_size": 2, "recompute_every": 0},
        "trl": {"id": "trl", "kind": "train", "loop": "trl.SFTTrainer", "phase": "main", "lora_r": 64,
                "samples_per_s": 9.0, "peak_reserved_gib": 30.0, "micro_batch_size": 16, "recompute_every": 1},
    }
    presets = bench_gpu.derive_presets(rows, card_gib=139.8)
    assert {card: p["row"] for card, p in presets.items()} == {"over-100gb": "keep", "80gb": "default",
                                                               "40gb": "40", "24gb": "24"}
    assert bench_gpu.derive_presets(rows, card_gib=79.2)["over-100gb"] is None  # an 80 GB card: no such preset
    # A faster row the fine-tune step cannot run as configured (a bench-only lever) is never a preset.
    rows["lever"] = {**rows["default"], "id": "lever", "samples_per_s": 5.0, "bench_levers": ["decoder MLPs compiled"]}
    assert bench_gpu.derive_presets(rows, card_gib=139.8)["80gb"]["row"] == "default"


@pytest.mark.slow
def test_harness_runs_every_row_on_the_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    """Every row kind the GPU run makes (bf16 base, recipe, TRL, default, each preset, each lever,
    each evaluation row) runs on CPU, so no row can break unnoticed until device time is spent.
    Liger is GPU-only (Triton): the TRL row runs without it here. The attention lever runs with
    eager attention, as no faster kernel installs on CPU; torch.compile traces with the eager backend."""
    monkeypatch.setattr(recipe, "RECIPE_MAX_NEW_TOKENS", 8)  # the row's code, not its 128 tokens of CPU time
    out = tmp_path / "bench.json"
    cfg = bench_gpu.BenchConfig(output=str(out), model_dir=str(tiny_model_dir), device="cpu", batch_size=8,
                                recipe_micro_batches=3, eval_batch_sizes="2", eval_batches=1, rows="all", repeats=1,
                                attention="eager")
    result = bench_gpu.run(cfg)
    saved = json.loads(out.read_text())
    rows = {r["id"]: r for r in saved["rows"]}
    assert list(rows) == [s.id for s in sorted(bench_gpu.row_specs(cfg), key=lambda s: s.phase != "bf16")]
    assert len(rows) == len(saved["rows"]) == 26
    assert [i for i, r in rows.items() if "error" in r or "skipped" in r] == []
    assert all(len(r["repeats"]) == 1 and r["spread"]["relative"] == 0 for r in rows.values())
    assert saved["config"]["repeats"] == 1
    assert rows["recipe"]["loop"] == "transformers.Trainer" and rows["default"]["loop"] == "project"
    assert rows["trl"]["loop"] == "trl.SFTTrainer" and rows["trl"]["micro_batch_size"] == 8
    assert rows["default"]["lora_layers"] == rows["recipe"]["lora_layers"] == rows["trl"]["lora_layers"]
    assert rows["preset-24gb"]["lora_r"] == 16 and rows["preset-fast"]["lora_r"] == 64  # the 24 GB preset's rank
    lever, preset = rows["lever-24gb-expandable"], rows["preset-24gb"]  # the allocator setting is CUDA's
    assert [lever[k] for k in ("lora_r", "micro_batch_size", "memory_cap_gib")] == [
        preset[k] for k in ("lora_r", "micro_batch_size", "memory_cap_gib")] and lever["expandable_segments"] is False
    assert rows["lever-fused-lora"]["fused_lora"] and not rows["default"]["fused_lora"]
    assert rows["lever-fused-lora"]["bench_levers"] and rows["lever-compile"]["bench_levers"]
    assert not any(rows[i]["bench_levers"] for i in ("default", "preset-fast", "preset-40gb", "preset-24gb", "keep-m4-off"))
    assert rows["keep-m4-off"]["micro_batch_size"] == 4 and rows["keep-m4-off"]["recompute_every"] == 0
    assert rows["lever-compile"]["compile_backend"] == "eager" and rows["lever-attention"]["attention"] == "eager"
    assert 1 <= rows["lever-compile"]["compiled_graphs"] <= 2  # one MLP graph, not one per layer
    assert rows["generate-static"]["static_cache"] and rows["bf16-m2"]["phase"] == "bf16"
    assert rows["lever-generate-compile-vision"]["compile_vision"] and not rows["generate"]["compile_vision"]
    assert all(r["repeats"][0]["warmup_s"] > 0 for r in rows.values() if r["kind"] == "eval")  # compile shows there
    summary = saved["summary"]
    assert summary["train_speedup"]["recipe"] == pytest.approx(1.0)
    assert result["summary"]["recipe_job_minutes"] > 0 and "ratio" in summary["trl_vs_project"]
    assert set(summary["goals"]) == set(bench_gpu.GOALS) and summary["presets"]["24gb"]["row"] in rows
    table = bench_gpu.render_markdown(saved)
    assert "| recipe (fp32) | transformers.Trainer |" in table and "n=1" in table


def test_rows_flag_selects_ids_and_groups_and_plan_needs_no_gpu(capsys):
    specs = bench_gpu.row_specs(bench_gpu.BenchConfig(output="-", variant="gemma-4-31b"))
    assert [s.id for s in bench_gpu.select_rows(specs, "recipe,presets")] == [
        "recipe", "preset-fast", "preset-40gb", "preset-24gb"]
    assert not {s.id for s in bench_gpu.select_rows(specs, "train,eval")} & {"bf16-m2", "recipe-generate-128"}
    result = bench_gpu.run(bench_gpu.BenchConfig(output="-", variant="gemma-4-31b", rows="default,generate", plan=True))
    printed = capsys.readouterr().out
    assert "default" in printed and "generate" in printed and "total" in printed and result["plan"]


@pytest.mark.parametrize("flags, message", [
    (["--variant", "gemma-4-31b", "--model-dir", "x"], "exactly one of --variant and --model-dir"),
    (["--variant", "gemma-4-31b", "--rows", "default,preset-48gb"], "--rows 'default,preset-48gb': unknown preset-48gb"),
    (["--variant", "gemma-4-31b", "--repeats", "0"], "--repeats must be positive"),
    (["--variant", "gemma-4-31b", "--eval-batch-sizes", "8,x"], "--eval-batch-sizes"),
    (["--variant", "gemma-4-31b", "--device", "cpu"], "needs a CUDA GPU"),
])
def test_bad_flags_are_named(flags, message, tmp_path, capsys):
    assert bench_gpu.main(["--output", str(tmp_path / "x.json"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
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


def test_a_lever_the_stack_cannot_run_is_recorded_not_fatal(tiny_model_dir, tmp_path):
    """An attention kernel this install cannot use is a skipped row with the reason, and the
    model comes back unchanged for the next row."""
    cfg = bench_gpu.BenchConfig(output=str(tmp_path / "x.json"), model_dir=str(tiny_model_dir), device="cpu",
                                batch_size=2, rows="lever-attention", attention="no-such-kernel")
    model = modeling.load_model(str(tiny_model_dir), torch.device("cpu"))
    before = model.config._attn_implementation
    ctx = bench_gpu.Context(cfg, torch.device("cpu"), None, [], [], [], 3)
    model, row = bench_gpu.train_row_project(model, ctx, name="lever", attention="no-such-kernel")
    assert row["skipped"].startswith("no-such-kernel: ") and model.config._attn_implementation == before


def _lora_stack(dropout: float):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 8))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules=["0", "2"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, where the update would vanish from the comparison
            torch.nn.init.normal_(param, std=0.5)
    return model


def _forward_backward(model, x, autocast: bool):
    torch.manual_seed(1)  # the same dropout masks in both runs
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out, x.grad, grads


@pytest.mark.parametrize("autocast, tolerance", [(False, 1e-5), (True, 2**-6)])
def test_fused_lora_adds_match_peft(autocast, tolerance, monkeypatch):
    """The fused LoRA adds lever (bench/fused_lora.py): output and every gradient as PEFT's
    forward (dropout on, same masks), without PEFT's forward running; adapters switched off
    still fall back to it."""
    from peft.tuners.lora.layer import Linear

    calls = []
    peft_forward = Linear.forward
    monkeypatch.setattr(Linear, "forward", lambda self, *a, **k: calls.append(1) or peft_forward(self, *a, **k))
    model, x = _lora_stack(dropout=0.1), torch.randn(3, 5, 16)
    reference = _forward_backward(model, x, autocast)
    assert len(calls) == 2
    assert fused_lora.fuse_lora_adds(model) == 2
    fused = _forward_backward(model, x, autocast)
    assert len(calls) == 2, "the fused forward must not call PEFT's"
    assert fused[0].dtype == reference[0].dtype
    for got, want in [(fused[0], reference[0]), (fused[1], reference[1])] + [
            (fused[2][n], reference[2][n]) for n in reference[2]]:
        torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance * want.abs().max().item())
    first, act, last = model.get_base_model()
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(x), last.get_base_layer()(act(first.get_base_layer()(x))))
    assert len(calls) == 4
    fused_lora.fuse_lora_adds(model, enabled=False)
    assert all("forward" not in m.__dict__ for m in model.modules() if isinstance(m, Linear))
