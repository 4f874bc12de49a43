"""QLoRA on CUDA, run on the device machine (`make test-gpu`); skipped where there is no GPU.

Tiny model, a few steps: the loss falls, the vision tower's linear layers are 4-bit and carry
LoRA, and merging into a bf16 reload of the base matches base + adapter.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from components import evaluate, finetune, merge_export, modeling

pytestmark = pytest.mark.gpu


def test_qlora_nf4_trains_vision_and_language_layers(tiny_model_dir, small_pets_dir, tmp_path):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    device = torch.device("cuda")
    assert modeling.resolve_quantization("auto", device) == "nf4"
    model = modeling.load_model(str(tiny_model_dir), device, "nf4")
    four_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    vision_4bit = {n for n in four_bit if n.startswith("model.vision_tower.")}
    language_4bit = {n for n in four_bit if n.startswith("model.language_model.")}
    assert vision_4bit and language_4bit, "vision tower and language model must both be 4-bit"
    some = model.get_submodule(sorted(vision_4bit)[0])
    assert some.weight.quant_state.quant_type == "nf4"
    assert some.weight.quant_state.nested, "double quantisation of the scales"
    targets = modeling.lora_target_modules(model)
    assert vision_4bit <= set(targets) and language_4bit <= set(targets)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    adapted_vision = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer) and "vision_tower" in n]
    assert adapted_vision and all(isinstance(peft_model.get_submodule(n).base_layer, bnb.nn.Linear4bit)
                                  for n in adapted_vision)

    out = tmp_path / "adapter"
    metrics = finetune.run(finetune.FinetuneConfig(
        model_dir=str(tiny_model_dir), dataset_dir=str(small_pets_dir), output_dir=str(out),
        lora_r=8, lora_alpha=16, learning_rate=1e-2, epochs=4, batch_size=8,
        log_every_steps=1, save_every_steps=2))
    assert metrics["quantization"] == "nf4" and metrics["gradient_checkpointing"] is True
    losses = [entry["loss"] for entry in metrics["log"]]
    print("nf4 losses", [round(x, 3) for x in losses], "peak MB", round(metrics["peak_memory_mb"], 1))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, "loss should fall"
    assert any("vision_tower" in m for m in metrics["adapted_modules"])

    export = tmp_path / "export"
    meta = merge_export.run(merge_export.MergeExportConfig(
        model_dir=str(tiny_model_dir), adapter_dir=str(out), output_dir=str(export),
        dataset_dir=str(small_pets_dir)))
    print("merge into bf16 reload: max |logit diff|", meta["max_abs_logit_diff"])
    saved = json.loads((export / "export_metadata.json").read_text())
    assert saved["max_abs_logit_diff"] <= saved["tolerance"]
    config = json.loads((export / "config.json").read_text())
    assert "quantization_config" not in config, "the export must be a plain bf16 model, not 4-bit"

    tuned = evaluate.run(evaluate.EvaluateConfig(
        model_dir=str(tiny_model_dir), adapter_dir=str(out), dataset_dir=str(small_pets_dir),
        output_dir=str(tmp_path / "eval"), mode="score", limit=16))
    merged = evaluate.run(evaluate.EvaluateConfig(
        model_dir=str(export), dataset_dir=str(small_pets_dir), output_dir=str(tmp_path / "eval-merged"),
        mode="score", limit=16, quantization="none"))
    print("score accuracy: base+adapter (nf4)", tuned["accuracy"], "merged bf16", merged["accuracy"])


def synthetic_adapter(model_dir, output, lr: float, steps: int, rank: int = 64) -> None:
    """LoRA r=64 on every fine-tuned layer, lora_A at PEFT's init, lora_B as after ``steps`` AdamW
    steps at ``lr`` (every entry +-lr*steps), saved as finetune saves it."""
    from peft import LoraConfig, get_peft_model

    model = modeling.load_model(str(model_dir), torch.device("cuda"))
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=modeling.lora_target_modules(model)))
    generator = torch.Generator("cuda").manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                signs = torch.randint(0, 2, param.shape, generator=generator, device=param.device) * 2 - 1
                param.copy_(signs * (lr * steps))
    peft_model.save_pretrained(output)
    del model, peft_model
    torch.cuda.empty_cache()


def test_merge_export_at_31b_widths(tmp_path):
    """Random-init 31B widths at 6 layers (4.7B parameters, 9.4 GB bf16 on disk): the recipe's
    adapter after a real job's ~130 steps at lr 5e-5 merges into the bf16 reload, in fp32 rounded
    once, within the noise floor; one after 3 steps (the rehearsal) is mostly under half a bf16
    ulp and the step says so instead of shipping it in bf16. Disk: base + export, < 20 GB."""
    from components import random_model

    base = tmp_path / "base"
    random_model.run(random_model.RandomModelConfig(variant="gemma-4-31b", layers=6, output_dir=str(base)))
    trained = tmp_path / "adapter-130"
    synthetic_adapter(base, trained, lr=5e-5, steps=130)
    export = tmp_path / "export"
    meta = merge_export.run(merge_export.MergeExportConfig(
        model_dir=str(base), adapter_dir=str(trained), output_dir=str(export), verify_samples=2, device="cuda"))
    verification = meta["verification"]
    print("31B widths, 6 layers, 130 steps:", json.dumps({k: meta[k] for k in ("dtype", "max_abs_logit_diff", "tolerance")}),
          json.dumps(verification))
    assert meta["dtype"] == "bfloat16" and verification["compute_dtype"] == "bfloat16"
    assert verification["weight_check"]["max_half_ulps"] <= 1
    assert verification["bf16_delta_kept"]["kept"] >= merge_export.DEFAULT_MIN_DELTA_KEPT
    assert meta["max_abs_logit_diff"] <= meta["tolerance"]
    assert verification["save_load_max_abs_logit_diff"] <= merge_export.SAVE_LOAD_TOLERANCE
    shutil.rmtree(export)
    short = tmp_path / "adapter-3"
    synthetic_adapter(base, short, lr=5e-5, steps=3)
    with pytest.raises(merge_export.ExportVerificationError, match="bf16 would keep") as failure:
        merge_export.run(merge_export.MergeExportConfig(
            model_dir=str(base), adapter_dir=str(short), output_dir=str(export), verify_samples=2,
            device="cuda", if_delta_lost="fail"))
    print("31B widths, 6 layers, 3 steps:", failure.value)
    assert not export.exists()
