"""Merge-export step: fold the LoRA adapter into the unquantised base, verify, ship a plain checkpoint.

Merged in fp32 and rounded once to the export dtype (not PEFT's merge_and_unload, which rounds into
the base's dtype and hides what was lost), checked per layer in weight space and in logits against
a measured noise floor, then reloaded from disk and checked again: docs/merge.md.

    gemma-pets merge-export --model-dir weights/ --adapter-dir adapter/ --dataset-dir data/ \\
        --metrics-path eval/metrics.json --output-dir export/
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import components
from components.artifacts import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DATASET_MANIFEST, EXPORT_METADATA,
                                  MODEL_CARD, TINY_MODEL_INFO, TRAIN_METRICS, WEIGHTS_MANIFEST, fmt)
from components.cli import UserError, entrypoint, parse_config
from components.files import atomic_dir, read_json, sha256_file, write_bytes_atomic, write_json_atomic

# Files of the base folder copied byte for byte so the export renders prompts and stops
# generating (at <turn|> as well as <eos>) exactly as the base does.
COPIED_FROM_BASE = ("generation_config.json", "chat_template.jinja", "chat_template.json")
METRIC_KEYS = ("accuracy", "macro_f1", "unknown_rate")
SAVE_DTYPES = ("bfloat16", "float32")
NOISE_IMAGE_SIDE = 64  # px; verification images when no dataset is given (any size works)

# Bounds of the checks; why these values, and what was measured: docs/merge.md ("The bounds").
FP32_LOGIT_NOISE = 1e-3  # the least logit bound, x the largest reference logit (at least 1): fp32 compute noise
FLOOR_SHARE = 0.5  # noise floors a right merge may be off in fp32 compute
BF16_FLOOR_SHARE = 2.0  # ... in bf16 compute, where both sides carry compute noise
SAVE_LOAD_TOLERANCE = 1e-6
DEFAULT_MIN_DELTA_KEPT = 0.5
NUDGE_FLOOR = 2.0 ** -60  # far under any trained weight, far over one ulp of bf16 near it
DELTA_LOST_ACTIONS = ("float32", "bfloat16", "fail")
SHARD_SIZE_PATTERN = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?$")


class ExportVerificationError(RuntimeError):
    """The merged export's logits differ from base + adapter by more than the tolerance."""


@dataclass
class MergeExportConfig:
    """Merge a LoRA adapter into its base, verify the saved export's logits, write a model card."""

    model_dir: str = field(metadata={"help": "staged base model folder (config.json, safetensors, processor)"})
    adapter_dir: str = field(metadata={"help": "fine-tune output: adapter_model.safetensors + adapter_config.json"})
    output_dir: str = field(metadata={"help": "export folder to write (replaced whole, only once verified)"})
    dataset_dir: str | None = field(default=None, metadata={
        "help": "prepared dataset: its eval split feeds the verification (default: seeded noise images)"})
    metrics_path: str | None = field(default=None, metadata={
        "help": "metrics.json of the evaluate step (accuracy, macro_f1, unknown_rate) for the model card"})
    tolerance: float | None = field(default=None, metadata={
        "help": f"max |logit difference| of the export versus base + adapter (default: {FLOOR_SHARE} x the "
                f"measured noise floor, {BF16_FLOOR_SHARE} x in bf16 compute, at least {FP32_LOGIT_NOISE} x the largest logit)"})
    verify_samples: int = field(default=4, metadata={"help": "eval samples whose logits are compared"})
    save_dtype: str = field(default="bfloat16", metadata={
        "help": "dtype of the saved weights (float32: twice the memory and disk of bfloat16)",
        "choices": list(SAVE_DTYPES)})
    min_delta_kept: float = field(default=DEFAULT_MIN_DELTA_KEPT, metadata={
        "help": "share of the adapter's weight change that bf16 must keep, else --if-delta-lost"})
    if_delta_lost: str = field(default="float32", metadata={
        "help": "when bf16 keeps too little: export float32, bfloat16 anyway (a warning), or fail",
        "choices": list(DELTA_LOST_ACTIONS)})
    max_shard_size: str = field(default="5GB", metadata={
        "help": "largest safetensors shard, e.g. 5GB (a bigger single tensor gets a shard of its own)"})
    verify_saved: bool = field(default=True, metadata={
        "help": "reload the saved export from disk and verify it (--no-verify-saved: the in-memory model)"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA if present), cuda, cuda:N or cpu"})

    def __post_init__(self) -> None:
        if self.tolerance is not None and not self.tolerance >= 0:
            raise ValueError(f"--tolerance must be >= 0, got {self.tolerance}")
        if not 0 <= self.min_delta_kept <= 1:
            raise ValueError(f"--min-delta-kept must be between 0 and 1, got {self.min_delta_kept}")
        if self.if_delta_lost not in DELTA_LOST_ACTIONS:
            raise ValueError(f"--if-delta-lost must be one of {', '.join(DELTA_LOST_ACTIONS)}, got {self.if_delta_lost!r}")
        if self.verify_samples < 1:
            raise ValueError(f"--verify-samples must be at least 1, got {self.verify_samples}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}")
        if not SHARD_SIZE_PATTERN.match(self.max_shard_size.strip()):
            raise ValueError(f"--max-shard-size must look like 5GB, 500MB or a byte count, got {self.max_shard_size!r}")
        _check_folders(self)  # last: the pipeline checks the values above before any task runs


def _check_folders(config: MergeExportConfig) -> None:
    """The input folders hold what their steps write; the output is none of them."""
    model = Path(config.model_dir)
    if not model.is_dir():
        raise FileNotFoundError(f"--model-dir {config.model_dir}: folder not found")
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"--model-dir {config.model_dir}: no config.json there (not a model folder)")
    adapter = Path(config.adapter_dir)
    if not adapter.is_dir():
        raise FileNotFoundError(f"--adapter-dir {config.adapter_dir}: folder not found")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (adapter / name).is_file():
            raise FileNotFoundError(
                f"--adapter-dir {config.adapter_dir}: no {name} there (not a finished fine-tune output)")
    if config.dataset_dir is not None and not (Path(config.dataset_dir) / DATASET_MANIFEST).is_file():
        raise FileNotFoundError(
            f"--dataset-dir {config.dataset_dir}: no {DATASET_MANIFEST} there (not a complete prepared dataset)")
    if config.metrics_path is not None and not Path(config.metrics_path).is_file():
        raise FileNotFoundError(f"--metrics-path {config.metrics_path}: file not found")
    output = Path(config.output_dir).resolve()
    for flag, value in (("--model-dir", config.model_dir), ("--adapter-dir", config.adapter_dir),
                        ("--dataset-dir", config.dataset_dir)):
        # The export replaces --output-dir whole; it must never be, or hold, an input.
        if value is not None and (output == Path(value).resolve() or output in Path(value).resolve().parents):
            raise ValueError(f"--output-dir {config.output_dir} would replace {flag} {value}; pick another folder")


# --- provenance -------------------------------------------------------------------------------


def read_metrics(path: str) -> dict:
    try:
        metrics = read_json(path)
    except json.JSONDecodeError as err:
        raise UserError(f"--metrics-path {path}: not valid JSON ({err})") from None
    missing = [key for key in METRIC_KEYS if key not in metrics]
    if missing:
        raise UserError(f"--metrics-path {path}: missing key(s) {missing}; not a metrics.json of the evaluate step")
    keep = (*METRIC_KEYS, "top5_accuracy", "num_examples", "mode")
    return {key: metrics[key] for key in keep if key in metrics}


def base_model_info(model_dir: str) -> dict:
    """Where the base came from: stage-weights' manifest when present, else just the folder."""
    info: dict[str, Any] = {"model_dir": str(model_dir), "source": None, "revision": None, "manifest_sha256": None}
    manifest_path = Path(model_dir) / WEIGHTS_MANIFEST
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        info.update({key: manifest.get(key) for key in ("source", "revision", "manifest_sha256")})
    stand_in = Path(model_dir) / TINY_MODEL_INFO
    if stand_in.is_file():
        info["stand_in"] = read_json(stand_in).get("stand_in")
    return info


def adapter_info(adapter_dir: str) -> tuple[dict, dict]:
    """(adapter identity, hyperparameters) from the adapter folder."""
    adapter = Path(adapter_dir)
    try:
        lora = read_json(adapter / ADAPTER_CONFIG)
    except json.JSONDecodeError as err:
        raise UserError(f"--adapter-dir {adapter_dir}: {ADAPTER_CONFIG} is not valid JSON ({err})") from None
    if lora.get("peft_type") != "LORA":
        raise UserError(f"--adapter-dir {adapter_dir}: {ADAPTER_CONFIG} has peft_type "
                        f"{lora.get('peft_type')!r}, this step merges LORA adapters")
    targets = lora.get("target_modules") or []
    if isinstance(targets, str):  # a regex in PEFT's config
        targets = [targets]
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as fh:
            adapted_layers = sum(1 for key in fh.keys() if ".lora_A." in key)
    except SafetensorError as err:  # empty, truncated or not safetensors: a bad input, named
        raise UserError(f"--adapter-dir {adapter_dir}: {ADAPTER_WEIGHTS} is not a readable "
                        f"safetensors file ({err})") from None
    identity = {
        "adapter_dir": str(adapter_dir),
        "adapter_model_sha256": sha256_file(adapter / ADAPTER_WEIGHTS),
        "adapter_config_sha256": sha256_file(adapter / ADAPTER_CONFIG),
        "trained_from": lora.get("base_model_name_or_path"),
    }
    hyper = {
        "lora": {
            "r": lora.get("r"),
            "lora_alpha": lora.get("lora_alpha"),
            "lora_dropout": lora.get("lora_dropout"),
            "bias": lora.get("bias"),
            "use_rslora": lora.get("use_rslora"),
            "use_dora": lora.get("use_dora"),
            # Layers with a LoRA pair in the file; PEFT may store target_modules shortened.
            "adapted_layers": adapted_layers,
            # Leaf names (q_proj, ..., linear for the vision tower's clipped linears): readable
            # where the full list runs to hundreds of names on the large models.
            "target_module_kinds": sorted({t.rsplit(".", 1)[-1] for t in targets}),
        },
        "finetune": None,
    }
    train_metrics = adapter / TRAIN_METRICS
    if train_metrics.is_file():
        train = read_json(train_metrics)
        hyper["finetune"] = train.get("hyperparameters")
        identity["train_summary"] = {k: train[k] for k in ("final_loss", "steps") if k in train}
    return identity, hyper


def dataset_info(dataset_dir: str | None) -> dict | None:
    if dataset_dir is None:
        return None
    path = Path(dataset_dir) / DATASET_MANIFEST
    return {"dataset_dir": str(dataset_dir), "manifest_sha256": sha256_file(path)}


# --- verification -----------------------------------------------------------------------------


def verification_inputs(processor, dataset_dir: str | None, count: int) -> tuple[list[dict], str]:
    """Model inputs of ``count`` samples (prompt + answer, one per batch: no padding to mask)."""
    from components import prompting

    if dataset_dir is not None:
        from components.shards import load_examples, read_manifest

        class_names = read_manifest(dataset_dir)["class_names"]
        examples = load_examples(dataset_dir, "eval", limit=count)
        if not examples:
            raise ValueError(f"--dataset-dir {dataset_dir}: the eval split is empty; nothing to verify the merge on")
        samples = [(ex.image(), ex.label_name) for ex in examples]
        described = f"{len(samples)} eval samples of {dataset_dir}"
    else:
        import numpy as np
        from PIL import Image

        class_names = ["cat", "dog"]
        rng = np.random.default_rng(0)
        samples = [
            (Image.fromarray(rng.integers(0, 256, (NOISE_IMAGE_SIDE, NOISE_IMAGE_SIDE, 3), dtype=np.uint8)),
             class_names[i % 2])
            for i in range(count)
        ]
        described = f"{count} seeded noise images (no --dataset-dir)"
    batches = []
    for image, answer in samples:
        batch = prompting.encode_training_batch(processor, [image], [answer], class_names)
        batch.pop("labels")
        batches.append(batch)
    return batches, described


def compute_logits(model, batches: list[dict], device) -> list:
    """Logits on the CPU, one tensor per sample, in the model's dtype (a real sample's bf16 logits
    are ~0.3 GB of host memory: docs/merge.md)."""
    import torch

    out = []
    with torch.inference_mode():
        for batch in batches:
            inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            out.append(model(**inputs).logits.cpu())
    return out


def compare_logits(reference: list, other: list) -> dict:
    """Max absolute difference, the same relative to the largest reference logit, argmax agreement."""
    import torch

    max_abs = 0.0
    ref_scale = 0.0
    agree = total = 0
    for ref, oth in zip(reference, other, strict=True):
        ref, oth = ref.float(), oth.float()
        diff = (ref - oth).abs()
        if not torch.isfinite(diff).all():
            max_abs = float("inf")
        else:
            max_abs = max(max_abs, float(diff.max()))
        ref_scale = max(ref_scale, float(ref.abs().max()))
        agree += int((ref.argmax(-1) == oth.argmax(-1)).sum())
        total += ref.shape[0] * ref.shape[1]
    return {
        "max_abs_logit_diff": max_abs,
        "max_rel_logit_diff": max_abs / ref_scale if ref_scale > 0 else max_abs,
        "argmax_agreement": agree / total,
    }


def load_adapter_strict(base, adapter_dir: str):
    """Base + adapter (unmerged); every tensor of the adapter file must land on a layer."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="pt") as fh:
        in_file = set(fh.keys())
    in_model = set(get_peft_model_state_dict(model).keys())
    unused, missing = sorted(in_file - in_model), sorted(in_model - in_file)
    if unused or missing:
        # PEFT only warns here; a merge that silently skips layers must not ship.
        raise ValueError(
            f"--adapter-dir {adapter_dir}: the adapter does not fit the base in --model-dir "
            f"({len(unused)} adapter tensors match no layer, e.g. {unused[:3]}; "
            f"{len(missing)} adapted layers have no tensor in the file, e.g. {missing[:3]}). "
            "Was it trained on another base model?")
    return model


# --- the merge, in weight space ------------------------------------------------------------------


def spacing(x, dtype):
    """The spacing (ulp) of ``dtype`` values at |x|, in fp32: half of it is the largest error of
    rounding x to ``dtype``."""
    import torch

    finfo = torch.finfo(dtype)
    _, exponent = torch.frexp(x.float())
    ulp = torch.ldexp(torch.full_like(x, finfo.eps, dtype=torch.float32), exponent - 1)
    return ulp.clamp_min(finfo.smallest_normal * finfo.eps)  # subnormals and zero


def adapted_layers(peft_model) -> list[tuple[str, Any, str]]:
    """(name, LoRA layer, adapter name) of every active LoRA pair."""
    from peft.tuners.lora import LoraLayer

    return [(name, module, adapter) for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer) for adapter in module.active_adapters if adapter in module.lora_A]


def lora_delta(layer, adapter):
    """s·B·A of one layer in fp32 (PEFT computes it in the adapter's dtype, bf16 on CUDA)."""
    return (layer.lora_B[adapter].weight.detach().float() @ layer.lora_A[adapter].weight.detach().float()) * layer.scaling[adapter]


def fold_delta(weight, delta, dtype):
    """The merged weight: W + s·B·A in fp32, rounded once to ``dtype`` (a seam the tests use to
    plant a wrong merge)."""
    return (weight.float() + delta).to(dtype)


def delta_kept(peft_model, dtype) -> dict:
    """How much of the adapter's weight change survives rounding W + s·B·A to ``dtype``; changes nothing."""
    delta_sq = lost_sq = 0.0
    below = entries = 0
    for _, layer, adapter in adapted_layers(peft_model):
        weight = layer.get_base_layer().weight
        delta = lora_delta(layer, adapter)
        lost_sq += float((((weight.float() + delta).to(dtype).float() - weight.float()) - delta).square().sum())
        delta_sq += float(delta.square().sum())
        below += int((delta.abs() < spacing(weight, dtype) / 2).sum())
        entries += delta.numel()
    kept = 1.0 - (lost_sq / delta_sq) ** 0.5 if delta_sq > 0 else 1.0
    return {"dtype": str(dtype).removeprefix("torch."), "kept": kept, "delta_norm": delta_sq ** 0.5,
            "lost_norm": lost_sq ** 0.5, "below_half_ulp": below / max(entries, 1), "entries": entries}


def merge_lora_(peft_model, dtype) -> dict:
    """Fold every adapter pair into its weight (values of ``dtype``, held in the model's dtype) and
    check each layer in weight space; returns the plain model and the check's numbers."""
    worst, worst_layer, layers = 0.0, None, 0
    for name, layer, adapter in adapted_layers(peft_model):
        weight = layer.get_base_layer().weight
        delta = lora_delta(layer, adapter)
        merged = fold_delta(weight, delta, dtype)
        exact = weight.float() + delta
        if merged.shape != exact.shape:
            raise ExportVerificationError(f"{name}: merged weight has shape {tuple(merged.shape)}, "
                                          f"the layer {tuple(exact.shape)}; the export was not written")
        # In units of half an ulp of the export dtype at the exact sum: <= 1 is one correct rounding.
        ratio = float(((merged.float() - exact).detach().abs() / (spacing(exact, dtype) / 2)).max())
        if not ratio <= worst:
            worst, worst_layer = ratio, name
        weight.data = merged.to(weight.dtype)
        layers += 1
    if not worst <= 1.0:  # written so that NaN fails too
        raise ExportVerificationError(
            f"weight check: {worst_layer} is {worst:.3g} half-ulps of {str(dtype).removeprefix('torch.')} "
            "away from W + s·B·A (a correct merge is at most 1); the export was not written")
    return {"layers": layers, "max_half_ulps": worst, "worst_layer": worst_layer}


def nudge_adapted_weights_(peft_model, dtype, seed: int, direction: int) -> None:
    """Move every adapted weight by one ulp of ``dtype`` in a seeded random direction; ``direction``
    -1 undoes +1 exactly (integer steps on the bit pattern). Weights under NUDGE_FLOOR, zeros
    among them, stay put: a step there could change sign, and the same mask must hold both ways."""
    import torch

    int_type = {2: torch.int16, 4: torch.int32}
    for index, (_, layer, _) in enumerate(adapted_layers(peft_model)):
        weight = layer.get_base_layer().weight.data
        step = round(torch.finfo(dtype).eps / torch.finfo(weight.dtype).eps)  # one ulp of dtype, in the bit pattern
        bits = weight.view(int_type[weight.element_size()])
        generator = torch.Generator(weight.device).manual_seed(seed + index)
        signs = torch.randint(0, 2, bits.shape, generator=generator, device=weight.device, dtype=bits.dtype) * 2 - 1
        bits.add_(torch.where(weight.abs() >= NUDGE_FLOOR, signs * (step * direction), 0))


def noise_floor(peft_model, batches, device, dtype) -> dict:
    """The base's logits moved by one ``dtype`` ulp on every adapted weight, versus the base: the
    most a correct rounding of the merged weights (half an ulp) should move them."""
    with peft_model.disable_adapter():
        base = compute_logits(peft_model, batches, device)
        nudge_adapted_weights_(peft_model, dtype, seed=0, direction=1)
        try:
            nudged = compute_logits(peft_model, batches, device)
        finally:
            nudge_adapted_weights_(peft_model, dtype, seed=0, direction=-1)
    return compare_logits(base, nudged)


def save_weights(model, folder: Path, max_shard_size: str) -> None:
    """safetensors shards + config (a seam the tests use to plant a corrupted file)."""
    model.save_pretrained(folder, max_shard_size=max_shard_size)


def cast_weights_(model, dtype) -> None:
    """Cast the parameters and persistent buffers (what the files hold) in place. Not
    ``model.to(dtype)``: RoPE's non-persistent ``inv_freq`` must stay fp32 (docs/merge.md)."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = buffer.to(dtype)


def release_memory(device) -> None:
    """Return a dropped model's memory now (call after the last reference is gone): modules hold
    reference cycles, so without a collection the weights would linger into the next load."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_tolerance(what: str, comparison: dict, bound: float, name: str) -> None:
    diff = comparison["max_abs_logit_diff"]
    if not diff <= bound:  # written so that NaN fails too
        raise ExportVerificationError(
            f"{what}: max |logit difference| {diff:.3g} is over {name} {bound:.3g} "
            f"(relative {comparison['max_rel_logit_diff']:.3g}, argmax agreement "
            f"{comparison['argmax_agreement']:.4f}); the export was not written")


# --- model card ---------------------------------------------------------------------------------


HUB_ID = re.compile(r"^(?:hf://|https://huggingface\.co/)?([\w.-]+/[\w.-]+)/?$")


def card_metadata(base: dict) -> str:
    """The card's YAML header (Hub metadata), written by huggingface_hub's ModelCardData."""
    from huggingface_hub import ModelCardData

    hub = HUB_ID.match(base["source"] or "")
    relation = {"base_model": hub.group(1), "base_model_relation": "finetune"} if hub else {}
    data = ModelCardData(library_name="transformers", pipeline_tag="image-text-to-text",
                         tags=["gemma4", "lora", "merged", "image-classification"], **relation)
    return f"---\n{data.to_yaml()}\n---\n"


def _card_intro(meta: dict) -> list[str]:
    return [
        "# Gemma 4 image classifier (LoRA merged)",
        "",
        "A Gemma 4 vision-language model fine-tuned with (Q)LoRA to name the class of an image, with the",
        "adapter merged into the weights. It loads like its base model:",
        "",
        "```python",
        "from transformers import AutoModelForMultimodalLM, AutoProcessor",
        "model = AutoModelForMultimodalLM.from_pretrained(EXPORT_DIR)",
        "processor = AutoProcessor.from_pretrained(EXPORT_DIR)",
        "```",
        "",
        "Prompt: one user turn holding the image, then this instruction with the class names joined by",
        "`, `; the model answers with one class name and stops at `<turn|>` (chat template and",
        "generation config copied from the base):",
        "",
        "    " + meta["prompt_instruction"],
        "",
    ]


def _table(heading: str, columns: str, rows: list[str]) -> list[str]:
    return [f"## {heading}", "", f"| {columns} |", "|---|---|", *rows, ""]


def _card_provenance(meta: dict) -> list[str]:
    """Base model, adapter and data, hyperparameters, evaluation."""
    base, adapter, data, hyper = meta["base_model"], meta["adapter"], meta["dataset"], meta["hyperparameters"]
    lines = _table("Base model", "field | value", [
        f"| source | {fmt(base['source'] or base['model_dir'])} |",
        f"| revision | {fmt(base['revision'])} |",
        f"| weights manifest sha256 | {fmt(base['manifest_sha256'])} |",
        *([f"| note | {base['stand_in']} |"] if base.get("stand_in") else [])])
    lines += _table("Adapter and training data", "field | value", [
        f"| adapter_model.safetensors sha256 | {adapter['adapter_model_sha256']} |",
        f"| adapter_config.json sha256 | {adapter['adapter_config_sha256']} |",
        f"| dataset manifest sha256 | {fmt(data and data['manifest_sha256'])} |",
        *[f"| training {k.replace('_', ' ')} | {fmt(v)} |" for k, v in adapter.get("train_summary", {}).items()]])
    lines += _table("Hyperparameters", "name | value", [
        *[f"| lora.{k} | {fmt(v)} |" for k, v in hyper["lora"].items()],
        *[f"| {k} | {fmt(v)} |" for k, v in (hyper["finetune"] or {}).items()]])
    lines += ["## Evaluation", ""]
    if meta["metrics"]:
        lines += ["| metric | value |", "|---|---|", *[f"| {k} | {fmt(v)} |" for k, v in meta["metrics"].items()]]
    else:
        lines.append("No evaluation metrics were given to the export step.")
    return lines + [""]


def _card_verification(meta: dict) -> list[str]:
    verify, dtype, bound = meta["verification"], meta["dtype"], fmt(meta["tolerance"])
    kept = verify["bf16_delta_kept"] and verify["bf16_delta_kept"]["kept"]
    return [
        "## Merge verification",
        "",
        f"Logits of the {verify['verified']} against base + adapter (unmerged) on "
        f"{verify['inputs']}, in {verify['compute_dtype']} on {verify['device']}:",
        "",
        "| check | value | bound |",
        "|---|---|---|",
        f"| max abs logit diff, export vs base + adapter | {fmt(meta['max_abs_logit_diff'])} | {bound} |",
        f"| max rel logit diff (to the largest reference logit) | {fmt(meta['max_rel_logit_diff'])} | |",
        f"| argmax agreement | {fmt(verify['argmax_agreement'])} | |",
        f"| noise floor: base vs base with every adapted weight one {dtype} ulp off | "
        f"{fmt(verify['noise_floor_max_abs_logit_diff'])} | |",
        f"| merged in memory vs base + adapter | {fmt(verify['merge_max_abs_logit_diff'])} | {bound} |",
        f"| save/load: reloaded export vs weights written | {fmt(verify['save_load_max_abs_logit_diff'])} | "
        f"{fmt(verify['save_load_tolerance'])} |",
        f"| adapter effect: base vs base + adapter | {fmt(verify['adapter_effect_max_abs_logit_diff'])} | |",
        f"| adapter's logit effect kept by the export | {fmt(verify['logit_effect_kept'])} | |",
        f"| weight check: worst layer, in half-ulps of {dtype} | {fmt(verify['weight_check']['max_half_ulps'])} | 1 |",
        f"| bf16's share of the adapter's weight change | {fmt(kept)} | |",
        "",
        f"Saved dtype: {dtype}.",
        "",
        f"Exported by gemma-pets {meta['project_version']} on {meta['created_at']}.",
        "Use of the weights is governed by the base model's license.",
        "",
    ]


def model_card(meta: dict) -> str:
    """README.md of the export: Hub metadata, how to load and prompt it, provenance, verification."""
    body = _card_intro(meta) + _card_provenance(meta) + _card_verification(meta)
    return card_metadata(meta["base_model"]) + "\n" + "\n".join(body)


# --- the step -----------------------------------------------------------------------------------


def export_dtype(config: MergeExportConfig, peft_model) -> tuple[Any, dict | None]:
    """The dtype to export in, and bf16's share of the adapter's weight change when asked for bf16."""
    import torch

    if config.save_dtype == "float32":
        return torch.float32, None
    kept = delta_kept(peft_model, torch.bfloat16)
    print(f"bf16 keeps {kept['kept']:.1%} of the adapter's weight change ||s·B·A|| = {kept['delta_norm']:.3g} "
          f"({kept['below_half_ulp']:.1%} of its entries are under half a bf16 ulp of W)")
    if kept["kept"] >= config.min_delta_kept:
        return torch.bfloat16, kept
    message = (f"bf16 would keep {kept['kept']:.1%} of the adapter's weight change, under --min-delta-kept "
               f"{config.min_delta_kept:g}")
    if config.if_delta_lost == "fail":
        raise ExportVerificationError(f"{message} (--if-delta-lost fail); the export was not written")
    print(f"warning: {message}: exporting in {config.if_delta_lost} (--if-delta-lost)", file=sys.stderr)
    return getattr(torch, config.if_delta_lost), kept


def floor_share(peft_model) -> float:
    """How many noise floors a right merge may be off, by compute dtype (docs/merge.md)."""
    import torch

    compute = next(peft_model.get_base_model().parameters()).dtype
    return FLOOR_SHARE if compute == torch.float32 else BF16_FLOOR_SHARE


def verify_merge(config: MergeExportConfig, peft_model, batches, device, dtype) -> tuple[Any, dict]:
    """Reference logits, the noise floor and the merge with its weight check: (merged model, numbers)."""
    reference = compute_logits(peft_model, batches, device)
    with peft_model.disable_adapter():
        effect = compare_logits(reference, compute_logits(peft_model, batches, device))
    floor = noise_floor(peft_model, batches, device, dtype)
    bound, source = logit_bound(config, peft_model, floor, reference)
    weights = merge_lora_(peft_model, dtype)
    merged = peft_model.unload()
    merged_logits = compute_logits(merged, batches, device)
    in_memory = compare_logits(reference, merged_logits)
    print(f"merged in float32, rounded once to {str(dtype).removeprefix('torch.')} ({weights['layers']} layers, "
          f"worst {weights['max_half_ulps']:.3g} half-ulps): max |logit diff| {in_memory['max_abs_logit_diff']:.3g} "
          f"versus base + adapter; noise floor {floor['max_abs_logit_diff']:.3g}; adapter effect "
          f"{effect['max_abs_logit_diff']:.3g}")
    if not in_memory["max_abs_logit_diff"] <= bound:
        # Tell an unstable forward from a wrong merge: the same model, the same inputs, once more.
        again = compare_logits(merged_logits, compute_logits(merged, batches, device))["max_abs_logit_diff"]
        print(f"the merged model's second forward differs from its first by {again:.3g}", file=sys.stderr)
    check_tolerance("merged model in memory versus base + adapter", in_memory, bound, source)
    if effect["max_abs_logit_diff"] <= bound:
        print(f"warning: the adapter moves logits by at most {effect['max_abs_logit_diff']:.3g}, within the bound "
              f"{bound:.3g}: only the weight check can tell the merged model from the base", file=sys.stderr)
    numbers = {"reference": reference, "merged_logits": merged_logits, "effect": effect, "floor": floor,
               "bound": bound, "bound_source": source, "weights": weights, "in_memory": in_memory}
    return merged, numbers


def logit_bound(config: MergeExportConfig, peft_model, floor: dict, reference: list) -> tuple[float, str]:
    """The logit bound and what set it: --tolerance, the noise floor, or the least fp32 bound."""
    if config.tolerance is not None:
        return config.tolerance, "--tolerance"
    by_floor = floor_share(peft_model) * floor["max_abs_logit_diff"]
    least = FP32_LOGIT_NOISE * max(max(float(r.abs().max()) for r in reference), 1.0)
    if by_floor >= least:
        return by_floor, "the noise floor"
    return least, f"the least bound ({FP32_LOGIT_NOISE:g} x the largest logit)"


def logit_effect_kept(final: dict, effect: dict) -> float | None:
    """1 - max |export - (base + adapter)| / max |base - (base + adapter)|."""
    if effect["max_abs_logit_diff"] == 0:
        return None
    return 1.0 - final["max_abs_logit_diff"] / effect["max_abs_logit_diff"]


def save_export(config: MergeExportConfig, merged, processor, tmp: Path, dtype) -> list[str]:
    """Save the merged weights and the base's processor files into ``tmp``; returns the copied files."""
    cast_weights_(merged, dtype)  # exact: the merged values are already values of ``dtype``
    merged.config.dtype = dtype  # config.json says what the shards hold
    save_weights(merged, tmp, config.max_shard_size)
    processor.save_pretrained(tmp)
    copied = []
    for name in COPIED_FROM_BASE:
        if (Path(config.model_dir) / name).is_file():
            shutil.copyfile(Path(config.model_dir) / name, tmp / name)
            copied.append(name)
    return copied


def check_export(config: MergeExportConfig, tmp: Path, dtype, device, batches, numbers: dict) -> tuple[dict | None, dict]:
    """Reload the saved export and compare it with what was written and with base + adapter; call
    it with no other model alive (two copies of a 31B model do not fit an 80 GB card).
    Returns (save/load comparison, final comparison)."""
    from components import modeling

    bound, source = numbers["bound"], numbers["bound_source"]
    if not config.verify_saved:
        final = numbers["in_memory"]
        check_tolerance("merged model as saved versus base + adapter", final, bound, source)
        return None, final
    # Loaded in the wider of the compute and export dtypes, as the reference was computed.
    exported = modeling.load_model(str(tmp), device, quantization="none", dtype=verification_dtype(device, dtype))
    exported_logits = compute_logits(exported, batches, device)
    del exported
    release_memory(device)
    save_load = compare_logits(numbers["merged_logits"], exported_logits)
    check_tolerance("saved export reloaded from disk versus the weights written", save_load,
                    SAVE_LOAD_TOLERANCE, "the save/load bound")
    final = compare_logits(numbers["reference"], exported_logits)
    check_tolerance("saved export reloaded from disk versus base + adapter", final, bound, source)
    return save_load, final


def verification_dtype(device, dtype):
    """The compute dtype, widened to fp32 for an fp32 export (never narrowing what is checked)."""
    import torch

    from components import modeling

    return torch.float32 if dtype == torch.float32 else modeling.compute_dtype(device)


def verification_record(config: MergeExportConfig, numbers: dict, final: dict, save_load: dict | None,
                        batches: list, device, compute, inputs_described: str, bf16_kept: dict | None) -> dict:
    """What was checked and how it came out, for export_metadata.json and the model card."""
    return {
        "inputs": inputs_described,
        "samples": len(batches),
        "device": str(device),
        "compute_dtype": str(compute).removeprefix("torch."),
        "verified": "saved export reloaded from disk" if config.verify_saved else
                    "in-memory merged model holding the saved values (--no-verify-saved)",
        "tolerance_source": numbers["bound_source"],
        "argmax_agreement": final["argmax_agreement"],
        "noise_floor_max_abs_logit_diff": numbers["floor"]["max_abs_logit_diff"],
        "merge_max_abs_logit_diff": numbers["in_memory"]["max_abs_logit_diff"],
        "save_load_max_abs_logit_diff": save_load and save_load["max_abs_logit_diff"],
        "save_load_tolerance": SAVE_LOAD_TOLERANCE,
        "adapter_effect_max_abs_logit_diff": numbers["effect"]["max_abs_logit_diff"],
        "logit_effect_kept": logit_effect_kept(final, numbers["effect"]),
        "weight_check": numbers["weights"],
        "bf16_delta_kept": bf16_kept,
    }


def run(config: MergeExportConfig) -> dict:
    from components import modeling, prompting

    # Cheap reads first, so bad input fails before any model is loaded.
    metrics = read_metrics(config.metrics_path) if config.metrics_path else None
    adapter, hyperparameters = adapter_info(config.adapter_dir)
    base_info = base_model_info(config.model_dir)
    data_info = dataset_info(config.dataset_dir)
    device, _ = modeling.checked_device(config.device, "none")  # never 4-bit

    processor = modeling.load_processor(config.model_dir)
    batches, inputs_described = verification_inputs(processor, config.dataset_dir, config.verify_samples)
    # Never merge into a 4-bit model: the base is reloaded unquantised in the compute dtype.
    base = modeling.load_model(config.model_dir, device, quantization="none")
    peft_model = load_adapter_strict(base, config.adapter_dir)
    dtype, bf16_kept = export_dtype(config, peft_model)
    compute = verification_dtype(device, dtype)
    if compute != modeling.compute_dtype(device):
        cast_weights_(peft_model, compute)  # an fp32 export merges, and is checked, in fp32
    merged, numbers = verify_merge(config, peft_model, batches, device, dtype)
    del peft_model, base
    with atomic_dir(config.output_dir) as tmp:
        copied = save_export(config, merged, processor, tmp, dtype)
        del merged  # the last reference: the reload must not find the merged model still in memory
        release_memory(device)
        save_load, final = check_export(config, tmp, dtype, device, batches, numbers)
        files = [
            {"path": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file() and (p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json"))
        ]
        verification = verification_record(config, numbers, final, save_load, batches, device, compute,
                                           inputs_described, bf16_kept)
        meta = {
            "base_model": base_info,
            "adapter": adapter,
            "dataset": data_info,
            "hyperparameters": hyperparameters,
            "metrics": metrics,
            "max_abs_logit_diff": final["max_abs_logit_diff"],
            "max_rel_logit_diff": final["max_rel_logit_diff"],
            "tolerance": numbers["bound"],
            "dtype": str(dtype).removeprefix("torch."),
            "verification": verification,
            "weights": files,
            "copied_from_base": copied,
            "max_shard_size": config.max_shard_size,
            "prompt_instruction": prompting.INSTRUCTION,
            "project_version": components.__version__,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        write_bytes_atomic(tmp / MODEL_CARD, model_card(meta).encode())
        write_json_atomic(tmp / EXPORT_METADATA, meta)  # last: marks the export complete
    print(f"wrote {config.output_dir}: {len(files)} weight file(s) in {meta['dtype']}, max |logit diff| "
          f"{final['max_abs_logit_diff']:.3g} <= {numbers['bound']:.3g}, adapter's logit effect kept "
          f"{fmt(verification['logit_effect_kept'])}")
    return meta


@entrypoint
def main(argv: list[str] | None = None) -> int:
    config = parse_config(MergeExportConfig, argv)
    try:
        run(config)  # reads and checks its inputs before loading the model
    except ExportVerificationError as err:
        print(f"error: merge verification failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
