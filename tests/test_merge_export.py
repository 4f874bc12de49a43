"""merge-export: the merged, saved export computes what base + adapter computes, or nothing ships."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from components import merge_export
from components.files import read_json, sha256_file, write_json_atomic
from components.merge_export import ExportVerificationError, MergeExportConfig

TRAIN_HYPERPARAMETERS = {"learning_rate": 5e-5, "epochs": 3, "micro_batch_size": 4, "lora_r": 8}
EVAL_METRICS = {"accuracy": 0.8125, "macro_f1": 0.79, "unknown_rate": 0.0625, "num_examples": 16, "mode": "generate"}
WEIGHTS_MANIFEST = {"source": "hf://google/gemma-4-E2B-it", "source_kind": "hf", "revision": "0123abc",
                    "manifest_sha256": "ab" * 32}


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """The 2-core CI box is shared; two intra-op threads on tiny matrices spin against each
    other (measured: a 630x64 by 64x128 matmul 34 ms with 2 threads, 0.9 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a stage-weights manifest, as a staged hub checkpoint has."""
    path = tmp_path_factory.mktemp("merge") / "base"
    shutil.copytree(tiny_model_dir, path)
    write_json_atomic(path / "weights_manifest.json", WEIGHTS_MANIFEST)
    return path


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    from components import prepare_dataset, synthetic_pets

    root = tmp_path_factory.mktemp("merge-data")
    assert synthetic_pets.main(["--output-dir", str(root / "raw"), "--num-classes", "3",
                                "--images-per-class", "4", "--seed", "0"]) in (0, None)
    assert prepare_dataset.main(["--source", str(root / "raw"), "--output-dir", str(root / "data")]) in (0, None)
    return root / "data"


def make_adapter(model_dir: Path, output: Path, b_scale: float = 0.02, seed: int = 1) -> Path:
    """A LoRA adapter over every target of modeling.lora_target_modules, saved as finetune does,
    with lora_B random instead of PEFT's zeros so base + adapter differs from the base."""
    from peft import LoraConfig, get_peft_model

    from components import modeling

    model = modeling.load_model(str(model_dir), torch.device("cpu"))
    targets = modeling.lora_target_modules(model)
    assert any(t.endswith(".linear") and "vision_tower" in t for t in targets)  # clipped linears
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * b_scale)
    peft_model.save_pretrained(output)
    write_json_atomic(output / "train_metrics.json", {
        "final_loss": 0.42, "steps": 12, "hyperparameters": TRAIN_HYPERPARAMETERS})
    return output


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory):
    return make_adapter(base_dir, tmp_path_factory.mktemp("merge") / "adapter")


@pytest.fixture(scope="module")
def metrics_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("merge-eval") / "metrics.json"
    write_json_atomic(path, {**EVAL_METRICS, "per_class": {}, "confusion_matrix": [], "class_names": []})
    return path


@pytest.fixture(scope="module")
def export(base_dir, adapter_dir, dataset_dir, metrics_path, tmp_path_factory):
    """One verified export on the CPU (fp32 merge, bf16 files), split into small shards."""
    output = tmp_path_factory.mktemp("merge-out") / "export"
    config = MergeExportConfig(model_dir=str(base_dir), adapter_dir=str(adapter_dir), output_dir=str(output),
                               dataset_dir=str(dataset_dir), metrics_path=str(metrics_path),
                               verify_samples=2, max_shard_size="400KB", device="cpu")
    meta = merge_export.run(config)
    return output, meta


def logits(model, batch):
    with torch.inference_mode():
        return model(**batch).logits.float()


def test_merged_export_matches_base_plus_adapter(export, base_dir, adapter_dir, dataset_dir):
    """torchtune-style equivalence, computed here independently of the step's own checks."""
    from peft import PeftModel
    from transformers import AutoModelForMultimodalLM

    from components import modeling, prompting
    from components.shards import load_examples, read_manifest

    output, meta = export
    example = load_examples(dataset_dir, "eval", limit=1)[0]
    processor = modeling.load_processor(str(base_dir))
    batch = prompting.encode_training_batch(processor, [example.image()], [example.label_name],
                                            read_manifest(dataset_dir)["class_names"])
    batch.pop("labels")
    base = AutoModelForMultimodalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base_logits = logits(base, batch)
    reference = logits(PeftModel.from_pretrained(base, adapter_dir).eval(), batch)
    merged = AutoModelForMultimodalLM.from_pretrained(output, dtype=torch.float32).eval()
    merged_logits = logits(merged, batch)

    diff = float((merged_logits - reference).abs().max())
    adapter_effect = float((base_logits - reference).abs().max())
    # The check can fail: the adapter moves logits far more than the merged export is off.
    assert adapter_effect > 0.3
    assert diff < adapter_effect / 5
    # The step measured the same things on its own samples.
    verification = meta["verification"]
    assert verification["compute_dtype"] == "float32" and meta["dtype"] == "bfloat16"
    assert verification["save_load_max_abs_logit_diff"] == 0.0  # the files hold exactly the merged weights
    # Judged against the measured noise floor (one bf16 ulp on every adapted weight), not a constant.
    assert meta["tolerance"] == merge_export.FLOOR_SHARE * verification["noise_floor_max_abs_logit_diff"] > 0
    assert verification["tolerance_source"] == "the noise floor"
    assert 0 < meta["max_abs_logit_diff"] <= meta["tolerance"]
    assert verification["adapter_effect_max_abs_logit_diff"] > 10 * meta["max_abs_logit_diff"]
    assert 0.8 < verification["logit_effect_kept"] < 1
    assert 0 < verification["weight_check"]["max_half_ulps"] <= 1
    assert verification["weight_check"]["layers"] == meta["hyperparameters"]["lora"]["adapted_layers"]
    assert verification["bf16_delta_kept"]["kept"] > 0.9
    assert verification["samples"] == 2


def test_export_loads_like_the_base(export, base_dir):
    from safetensors import safe_open
    from transformers import AutoModelForMultimodalLM, AutoProcessor, Gemma4ForConditionalGeneration

    output, meta = export
    model = AutoModelForMultimodalLM.from_pretrained(output)
    processor = AutoProcessor.from_pretrained(output)
    base_processor = AutoProcessor.from_pretrained(base_dir)
    assert isinstance(model, Gemma4ForConditionalGeneration)
    assert model.dtype == torch.bfloat16
    assert processor.chat_template == base_processor.chat_template
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which?"}]}]
    assert processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<bos><|turn>user\n<|image|>Which?<turn|>\n<|turn>model\n")
    turn_close = processor.tokenizer.convert_tokens_to_ids("<turn|>")
    assert turn_close in model.generation_config.eos_token_id
    assert (output / "generation_config.json").read_bytes() == (base_dir / "generation_config.json").read_bytes()

    # Sharded as asked, plain weights only: no LoRA tensors, no PEFT prefixes.
    index = read_json(output / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert sorted(w["path"] for w in meta["weights"]) == sorted(shards + ["model.safetensors.index.json"])
    for entry in meta["weights"]:
        assert sha256_file(output / entry["path"]) == entry["sha256"]
    keys = set()
    for shard in shards:
        with safe_open(str(output / shard), framework="pt") as fh:
            keys |= set(fh.keys())
    assert not [k for k in keys if "lora" in k or k.startswith("base_model.")]

    # The vision tower's clipped linears were merged, and their clip bounds kept.
    base = AutoModelForMultimodalLM.from_pretrained(base_dir)
    name = "model.vision_tower.encoder.layers.0.self_attn.q_proj"
    merged_layer, base_layer = model.get_submodule(name), base.get_submodule(name)
    assert not torch.equal(merged_layer.linear.weight, base_layer.linear.weight)
    for bound in ("input_min", "input_max", "output_min", "output_max"):
        assert torch.isfinite(getattr(base_layer, bound))
        assert torch.equal(getattr(merged_layer, bound), getattr(base_layer, bound))


def test_model_card_and_metadata(export, base_dir, adapter_dir, dataset_dir):
    import components

    output, meta = export
    assert read_json(output / "export_metadata.json") == meta
    assert meta["base_model"]["source"] == WEIGHTS_MANIFEST["source"]
    assert meta["base_model"]["revision"] == WEIGHTS_MANIFEST["revision"]
    assert meta["base_model"]["manifest_sha256"] == WEIGHTS_MANIFEST["manifest_sha256"]
    assert meta["adapter"]["adapter_model_sha256"] == sha256_file(adapter_dir / "adapter_model.safetensors")
    assert meta["dataset"]["manifest_sha256"] == sha256_file(dataset_dir / "manifest.json")
    assert meta["hyperparameters"]["finetune"] == TRAIN_HYPERPARAMETERS
    lora = meta["hyperparameters"]["lora"]
    assert (lora["r"], lora["lora_alpha"], lora["lora_dropout"]) == (8, 16, 0.05)
    assert "linear" in lora["target_module_kinds"] and lora["adapted_layers"] > 20
    assert meta["metrics"] == EVAL_METRICS
    assert meta["project_version"] == components.__version__
    assert re.match(r"\d{4}-\d\d-\d\dT", meta["created_at"])

    card = (output / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "base_model: google/gemma-4-E2B-it" in front
    assert "library_name: transformers" in front
    hub_card = ModelCard.load(output / "README.md")  # the header is valid Hub metadata
    assert (hub_card.data.base_model, hub_card.data.base_model_relation) == ("google/gemma-4-E2B-it", "finetune")
    assert hub_card.data.pipeline_tag == "image-text-to-text" and "lora" in hub_card.data.tags
    for text in (WEIGHTS_MANIFEST["source"], WEIGHTS_MANIFEST["revision"], WEIGHTS_MANIFEST["manifest_sha256"],
                 meta["dataset"]["manifest_sha256"], meta["adapter"]["adapter_model_sha256"],
                 "| accuracy | 0.8125 |", "| macro_f1 | 0.79 |", "| unknown_rate | 0.0625 |",
                 "| learning_rate | 5e-05 |", "| lora.r | 8 |", f"{meta['max_abs_logit_diff']:.4g}",
                 "| training final loss | 0.42 |", "AutoModelForMultimodalLM", components.__version__):
        assert text in body, text


def wrong_scale(weight, delta, dtype):
    return (weight.float() + 2 * delta).to(dtype)


def transposed(weight, delta, dtype):
    return (weight.float() + delta.t().reshape(delta.shape)).to(dtype)


def skipped(weight, delta, dtype):
    return weight.to(dtype)


@pytest.mark.parametrize("wrong_merge", [wrong_scale, transposed, skipped])
def test_wrong_merge_fails_the_weight_check(wrong_merge, base_dir, adapter_dir, dataset_dir, tmp_path,
                                            monkeypatch, capsys):
    """A wrong scale, a transposed delta or a skipped layer misses W + s·B·A by far more than one
    rounding to bf16, on every layer."""
    monkeypatch.setattr(merge_export, "fold_delta", wrong_merge)
    output = tmp_path / "export"
    code = merge_export.main(["--model-dir", str(base_dir), "--adapter-dir", str(adapter_dir),
                              "--dataset-dir", str(dataset_dir), "--output-dir", str(output),
                              "--verify-samples", "1", "--device", "cpu"])
    assert code == 1
    err = capsys.readouterr().err
    assert "merge verification failed: weight check:" in err and "half-ulps of bfloat16" in err
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []  # no half-built folder left beside it either


def test_wrong_model_after_the_merge_fails_the_logit_check(base_dir, adapter_dir, tmp_path, monkeypatch, capsys):
    """A layer damaged outside the adapted weights (the weight check's blind spot) moves the logits
    far past the noise floor."""
    real_merge = merge_export.merge_lora_

    def merge_then_damage(peft_model, dtype):
        numbers = real_merge(peft_model, dtype)
        with torch.no_grad():
            peft_model.base_model.model.model.language_model.layers[1].post_feedforward_layernorm.weight.mul_(2)
        return numbers

    monkeypatch.setattr(merge_export, "merge_lora_", merge_then_damage)
    config = MergeExportConfig(model_dir=str(base_dir), adapter_dir=str(adapter_dir),
                               output_dir=str(tmp_path / "export"), verify_samples=1, device="cpu")
    with pytest.raises(ExportVerificationError, match=r"merged model in memory versus base \+ adapter.*the noise floor"):
        merge_export.run(config)
    assert not (tmp_path / "export").exists()
    # A wrong merge, not an unstable forward: the damaged model computes the same twice.
    assert "second forward differs from its first by 0\n" in capsys.readouterr().err


def test_noise_floor_restores_the_weights_bit_for_bit(base_dir, adapter_dir):
    from peft import PeftModel

    from components import modeling

    model = PeftModel.from_pretrained(modeling.load_model(str(base_dir), torch.device("cpu")), str(adapter_dir))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    merge_export.nudge_adapted_weights_(model, torch.bfloat16, seed=0, direction=1)
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert moved and all("base_layer" in name for name in moved)
    one = before[moved[0]]
    steps = (model.get_parameter(moved[0]).detach() - one).abs() / merge_export.spacing(one, torch.bfloat16)
    # One bf16 ulp each (half of it down from a power of two, where the spacing halves).
    assert ((steps == 1) | (steps == 0.5))[one != 0].all() and (steps == 1).float().mean() > 0.9
    merge_export.nudge_adapted_weights_(model, torch.bfloat16, seed=0, direction=-1)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_spacing_is_the_ulp():
    x = torch.tensor([1.0, 1.5, 0.02, -0.02, 3e-41])
    assert merge_export.spacing(x, torch.bfloat16).tolist()[:4] == [2**-7, 2**-7, 2**-13, 2**-13]
    assert merge_export.spacing(x, torch.float32).tolist()[:2] == [2**-23, 2**-23]
    values = torch.randn(10000) * 0.05
    error = (values.to(torch.bfloat16).float() - values).abs()
    assert (error <= merge_export.spacing(values, torch.bfloat16) / 2).all()
    assert (error > merge_export.spacing(values, torch.bfloat16) / 4).any()


@pytest.fixture(scope="module")
def small_delta_adapter(base_dir, tmp_path_factory):
    """An adapter whose s·B·A sits under half a bf16 ulp of W, as after a few steps at a low lr."""
    return make_adapter(base_dir, tmp_path_factory.mktemp("merge") / "small-adapter", b_scale=2e-5)


def test_delta_lost_in_bf16_exports_float32(base_dir, small_delta_adapter, tmp_path, capsys):
    output = tmp_path / "export"
    meta = merge_export.run(MergeExportConfig(model_dir=str(base_dir), adapter_dir=str(small_delta_adapter),
                                              output_dir=str(output), verify_samples=1, device="cpu"))
    assert "warning: bf16 would keep" in capsys.readouterr().err
    kept = meta["verification"]["bf16_delta_kept"]
    assert kept["kept"] < merge_export.DEFAULT_MIN_DELTA_KEPT and kept["below_half_ulp"] > 0.5
    assert meta["dtype"] == "float32" and read_json(output / "config.json")["dtype"] == "float32"
    assert meta["verification"]["logit_effect_kept"] > 0.99
    assert meta["verification"]["weight_check"]["max_half_ulps"] <= 1


def test_delta_lost_in_bf16_other_choices(base_dir, small_delta_adapter, tmp_path):
    config = dict(model_dir=str(base_dir), adapter_dir=str(small_delta_adapter), verify_samples=1, device="cpu")
    with pytest.raises(ExportVerificationError, match=r"bf16 would keep .* under --min-delta-kept 0.5"):
        merge_export.run(MergeExportConfig(output_dir=str(tmp_path / "a"), if_delta_lost="fail", **config))
    assert not (tmp_path / "a").exists()
    meta = merge_export.run(MergeExportConfig(output_dir=str(tmp_path / "b"), if_delta_lost="bfloat16", **config))
    assert meta["dtype"] == "bfloat16" and meta["verification"]["logit_effect_kept"] < 0.5
    meta = merge_export.run(MergeExportConfig(output_dir=str(tmp_path / "c"), min_delta_kept=0.0, **config))
    assert meta["dtype"] == "bfloat16"


def test_damaged_file_on_disk_fails(base_dir, adapter_dir, tmp_path, monkeypatch):
    """The in-memory merge is right; one tensor in the written file is not. Only reloading the
    saved export from disk can see it."""
    from safetensors.torch import load_file, save_file

    real_save = merge_export.save_weights

    def save_then_damage(model, folder, max_shard_size):
        real_save(model, folder, max_shard_size)
        path = folder / "model.safetensors"
        tensors = load_file(path)
        key = "model.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight"
        tensors[key] = tensors[key] * 2
        save_file(tensors, path, metadata={"format": "pt"})

    monkeypatch.setattr(merge_export, "save_weights", save_then_damage)
    output = tmp_path / "export"
    config = MergeExportConfig(model_dir=str(base_dir), adapter_dir=str(adapter_dir), output_dir=str(output),
                               verify_samples=1, device="cpu")  # no dataset: seeded noise images
    with pytest.raises(ExportVerificationError, match="reloaded from disk versus the weights written"):
        merge_export.run(config)
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []


def test_adapter_for_another_base_is_refused(base_dir, adapter_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    foreign = tmp_path / "adapter"
    shutil.copytree(adapter_dir, foreign)
    tensors = load_file(foreign / "adapter_model.safetensors")
    # A layer this 4-layer model does not have, as an adapter trained on a deeper model holds.
    for suffix in ("lora_A", "lora_B"):
        key = next(k for k in tensors if f"layers.0.self_attn.q_proj.{suffix}" in k)
        tensors[key.replace("layers.0.", "layers.9.")] = tensors[key].clone()
    save_file(tensors, foreign / "adapter_model.safetensors", metadata={"format": "pt"})
    config = MergeExportConfig(model_dir=str(base_dir), adapter_dir=str(foreign),
                               output_dir=str(tmp_path / "export"), verify_samples=1, device="cpu")
    with pytest.raises(ValueError, match=r"does not fit the base.*2 adapter tensors match no layer"):
        merge_export.run(config)
    assert not (tmp_path / "export").exists()


def test_bad_inputs_are_named_before_any_work(base_dir, adapter_dir, dataset_dir, tmp_path, capsys):
    def config(**overrides):
        args = dict(model_dir=str(base_dir), adapter_dir=str(adapter_dir), output_dir=str(tmp_path / "out"))
        return MergeExportConfig(**{**args, **overrides})

    with pytest.raises(FileNotFoundError, match=r"--model-dir .*missing: folder not found"):
        config(model_dir=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"--model-dir .*no config.json"):
        config(model_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"--adapter-dir .*nope: folder not found"):
        config(adapter_dir=str(tmp_path / "nope"))
    half = tmp_path / "half-adapter"
    half.mkdir()
    shutil.copy(adapter_dir / "adapter_config.json", half)
    with pytest.raises(FileNotFoundError, match=r"--adapter-dir .*no adapter_model.safetensors"):
        config(adapter_dir=str(half))
    with pytest.raises(FileNotFoundError, match=r"--dataset-dir .*no manifest.json"):
        config(dataset_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"--metrics-path .*not found"):
        config(metrics_path=str(tmp_path / "metrics.json"))
    with pytest.raises(ValueError, match=r"would replace --adapter-dir"):
        config(output_dir=str(adapter_dir))
    with pytest.raises(ValueError, match=r"would replace --model-dir"):
        config(output_dir=str(base_dir.parent))
    with pytest.raises(ValueError, match=r"--verify-samples"):
        config(verify_samples=0)
    with pytest.raises(ValueError, match=r"--tolerance must be >= 0"):
        config(tolerance=-1.0)
    with pytest.raises(ValueError, match=r"--max-shard-size"):
        config(max_shard_size="big")

    bad_metrics = tmp_path / "metrics.json"
    bad_metrics.write_text(json.dumps({"accuracy": 0.5}))
    with pytest.raises(ValueError, match=r"--metrics-path .*missing key\(s\) \['macro_f1', 'unknown_rate'\]"):
        merge_export.run(config(metrics_path=str(bad_metrics)))

    # Through the command line: a clear one-line error and a non-zero exit, no traceback.
    assert merge_export.main(["--model-dir", str(tmp_path / "missing"), "--adapter-dir", str(adapter_dir),
                              "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: --model-dir")
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_merge_export_on_cuda_bf16(base_dir, adapter_dir, dataset_dir, tmp_path):
    """On CUDA the base reloads in bf16 (never 4-bit), the merge is computed in fp32 and rounded
    once, and the bf16 export stays within the bf16 noise floor."""
    output = tmp_path / "export"
    meta = merge_export.run(MergeExportConfig(model_dir=str(base_dir), adapter_dir=str(adapter_dir),
                                              output_dir=str(output), dataset_dir=str(dataset_dir),
                                              verify_samples=4, device="cuda"))
    verification = meta["verification"]
    print("cuda bf16 verification:", json.dumps(verification))
    assert verification["compute_dtype"] == "bfloat16" and verification["device"].startswith("cuda")
    assert meta["tolerance"] == merge_export.BF16_FLOOR_SHARE * verification["noise_floor_max_abs_logit_diff"]
    assert meta["dtype"] == "bfloat16"
    assert verification["weight_check"]["max_half_ulps"] <= 1
    assert meta["max_abs_logit_diff"] <= meta["tolerance"]
    assert verification["save_load_max_abs_logit_diff"] <= merge_export.SAVE_LOAD_TOLERANCE
    assert (output / "export_metadata.json").is_file()


def test_fp32_export_without_reload(base_dir, adapter_dir, tmp_path):
    """--save-dtype float32 keeps the fp32 merge exactly, so the fp32 bound applies to the export;
    --no-verify-saved checks the merged weights in memory instead of a reload."""
    from transformers import AutoModelForMultimodalLM

    output = tmp_path / "export"
    meta = merge_export.run(MergeExportConfig(model_dir=str(base_dir), adapter_dir=str(adapter_dir),
                                              output_dir=str(output), verify_samples=1, save_dtype="float32",
                                              verify_saved=False, device="cpu"))
    assert meta["dtype"] == "float32" and meta["verification"]["compute_dtype"] == "float32"
    # the least bound, relative to the logits (the fp32 floor is far under it), and far under the
    # adapter's effect, so the logit check still sees a merge that lost the adapter
    largest = meta["max_abs_logit_diff"] / meta["max_rel_logit_diff"]
    assert meta["tolerance"] == pytest.approx(merge_export.FP32_LOGIT_NOISE * max(largest, 1.0))
    assert meta["verification"]["tolerance_source"].startswith("the least bound")
    assert meta["verification"]["noise_floor_max_abs_logit_diff"] < meta["tolerance"]
    assert meta["max_abs_logit_diff"] == meta["verification"]["merge_max_abs_logit_diff"] <= meta["tolerance"]
    assert meta["verification"]["adapter_effect_max_abs_logit_diff"] > 10 * meta["tolerance"]
    assert meta["verification"]["bf16_delta_kept"] is None
    assert meta["verification"]["save_load_max_abs_logit_diff"] is None
    assert "in-memory" in meta["verification"]["verified"]
    assert "noise images" in meta["verification"]["inputs"] and meta["dataset"] is None
    assert read_json(output / "config.json")["dtype"] == "float32"
    assert AutoModelForMultimodalLM.from_pretrained(output, dtype="auto").dtype == torch.float32


def test_the_export_is_reloaded_with_no_other_model_in_memory(base_dir, adapter_dir, tmp_path, monkeypatch):
    """The saved export is reloaded for its check only after the merged model is gone: holding both
    doubled merge-export's GPU peak at 31B widths (45.5 GB for a 21.5 GB model, docs/rehearsal.md),
    which at the full 31B (2 x 62.5 GB) fits neither an 80 GB nor a 96 GB card."""
    import gc
    import weakref

    from components import modeling

    loaded, real_load = [], modeling.load_model

    def load_model(*args, **kwargs):
        gc.collect()
        assert [ref for ref in loaded if ref() is not None] == [], "a model is still in memory at this load"
        model = real_load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(modeling, "load_model", load_model)
    meta = merge_export.run(MergeExportConfig(model_dir=str(base_dir), adapter_dir=str(adapter_dir),
                                              output_dir=str(tmp_path / "export"), verify_samples=1, device="cpu"))
    assert len(loaded) == 2 and meta["verification"]["save_load_max_abs_logit_diff"] == 0.0


def test_tolerance_zero_rejects_the_bf16_rounding(base_dir, adapter_dir, tmp_path):
    """A bf16 export differs from the fp32 base + adapter by the rounding of the merged weights,
    so a zero tolerance must refuse it."""
    output = tmp_path / "export"
    config = MergeExportConfig(model_dir=str(base_dir), adapter_dir=str(adapter_dir), output_dir=str(output),
                               verify_samples=1, tolerance=0.0, device="cpu")
    with pytest.raises(ExportVerificationError, match=r"merged model in memory versus base \+ adapter.*--tolerance 0"):
        merge_export.run(config)
    assert not output.exists()
