"""Merge-export step: fold the LoRA adapter into the base weights and ship a plain checkpoint.

One readable recipe:
  1. reload the base unquantised (bf16 on CUDA, fp32 on CPU): merging into a 4-bit model would
     round the merged weights to nf4 and lose most of what the adapter learned;
  2. put the PEFT adapter on it and record reference logits of base + adapter (unmerged) on a
     few eval samples, and the base's own logits (adapter disabled) to know the adapter's effect;
  3. merge (``merge_and_unload``) and check the merged model's logits against the reference;
  4. save the merged weights (bf16 by default, safetensors shards), the base's processor, chat
     template and generation config, into a temporary folder;
  5. reload that saved folder from disk, as a server would, and check its logits against the
     reference; over ``--tolerance`` the step fails and the temporary folder is removed;
  6. write README.md (model card) and export_metadata.json (last), then move the folder into place.

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
from components.cli import UserError, entrypoint, parse_config
from components.files import atomic_dir, read_json, sha256_file, write_bytes_atomic, write_json_atomic

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
WEIGHTS_MANIFEST = "weights_manifest.json"  # written by stage-weights into the model folder
TRAIN_METRICS = "train_metrics.json"  # written by finetune into the adapter folder
DATASET_MANIFEST = "manifest.json"
METADATA_FILE = "export_metadata.json"  # written last: its presence marks a complete export
MODEL_CARD = "README.md"
# Files of the base folder copied byte for byte so the export renders prompts and stops
# generating (at <turn|> as well as <eos>) exactly as the base does.
COPIED_FROM_BASE = ("generation_config.json", "chat_template.jinja", "chat_template.json")
METRIC_KEYS = ("accuracy", "macro_f1", "unknown_rate")
SAVE_DTYPES = ("bfloat16", "float32")
NOISE_IMAGE_SIDE = 64  # px; verification images when no dataset is given (any size works)

# Three logit checks, each against its own bound. Gemma 4 soft-caps logits to (-30, 30), so an
# absolute bound on logits means the same thing for every model size. Numbers measured on the
# tiny stand-in (tests/test_merge_export.py, adapter with ||s BA|| at 10-80% of ||W||, 1-4
# eval samples); they are the floor of each comparison's noise, not a real model's level.
#  1. merge math: the merged model in memory versus base + adapter (unmerged), both in the
#     compute dtype. They differ only in the order of sums: W x + s B(A x) versus (W + s BA) x.
#     fp32 (CPU): measured 5e-6 to 1.3e-5; bound 1e-3, while one wrongly merged layer (a test
#     scales one MLP by 1.5) moves logits by ~1e-1 and an unmerged adapter by ~1.
#     bf16 (CUDA): both sides round every matmul output and the merged weights to bf16 (8-bit
#     mantissa); measured up to 1.17 on an H200 (tiny model). Bound TOLERANCE_BF16_COMPUTE.
#  2. save/load fidelity: the export reloaded from disk versus the in-memory merged model holding
#     the save dtype's values, i.e. the very weights written. Same weights, same kernels: measured
#     exactly 0.0 on CPU (fp32) and on an H200 (bf16); any difference means a tensor was dropped,
#     renamed or mangled on its way through the files. Bound 1e-6 (fp32 round-off at most).
#  3. the headline, --tolerance: the export reloaded from disk versus base + adapter, i.e. what
#     gets served versus what was evaluated.
#     fp32 export, fp32 compute: as check 1, TOLERANCE_FP32.
#     bf16 export, fp32 compute (CPU default): adds the rounding of W + s BA to bf16, up to half a
#     bf16 ulp (2^-9 relative) per weight whatever the size of s BA; measured 0.049 to 0.062.
#     That is the error of casting an fp32 model to bf16, which for billion-parameter LMs is
#     reported at about 0.1-0.3 in max |logit| over ~10^8 logits (262k vocabulary x a few hundred
#     positions). Bound TOLERANCE_BF16_EXPORT = 0.5.
#     bf16 compute (CUDA): bf16 matmul noise on both sides on top of that, which grows with the
#     size of the logits (bf16 spacing is 0.125 between 16 and 32). Measured on an H200 with the
#     tiny model, whose logits reach the +-30 softcap: 0.76 to 1.17, against an adapter effect of
#     13.3. Bound TOLERANCE_BF16_COMPUTE = 2.0, well below the several logits a fine-tuned
#     adapter moves the answer tokens by. The adapter's own effect (base versus base + adapter)
#     is recorded next to it, to show whether the check could tell them apart. Not yet measured
#     on a real Gemma 4 checkpoint (no hub here): read the recorded diffs of the first real
#     export and narrow these bounds from them.
TOLERANCE_FP32 = 1e-3
TOLERANCE_BF16_EXPORT = 0.5
TOLERANCE_BF16_COMPUTE = 2.0
SAVE_LOAD_TOLERANCE = 1e-6
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
        "help": "prepared dataset: its eval split feeds the verification and its manifest hash goes "
                "in the model card; without it, seeded noise images are used"})
    metrics_path: str | None = field(default=None, metadata={
        "help": "metrics.json of the evaluate step (accuracy, macro_f1, unknown_rate) for the model card"})
    tolerance: float | None = field(default=None, metadata={
        "help": "max allowed |logit difference| of the saved export versus base + adapter (unmerged); "
                f"default {TOLERANCE_FP32} with an fp32 export and fp32 compute, {TOLERANCE_BF16_EXPORT} with a "
                f"bf16 export and fp32 compute (CPU), {TOLERANCE_BF16_COMPUTE} with bf16 compute (CUDA)"})
    merge_tolerance: float | None = field(default=None, metadata={
        "help": "max allowed |logit difference| of the merged model in memory versus base + adapter, "
                f"both in the compute dtype; default {TOLERANCE_FP32} in fp32 (CPU), {TOLERANCE_BF16_COMPUTE} in bf16 (CUDA)"})
    verify_samples: int = field(default=4, metadata={"help": "eval samples whose logits are compared"})
    save_dtype: str = field(default="bfloat16", metadata={
        "help": "dtype of the saved weights (bfloat16: what Gemma checkpoints ship; float32 on CUDA "
                "holds the merged model in fp32 on the GPU while saving, twice its bf16 size)",
        "choices": list(SAVE_DTYPES)})
    max_shard_size: str = field(default="5GB", metadata={
        "help": "largest safetensors shard, e.g. 5GB (a bigger single tensor gets a shard of its own)"})
    verify_saved: bool = field(default=True, metadata={
        "help": "reload the saved export from disk and verify it (what gets served). Peak memory stays "
                "one model (the in-memory merged model is freed first); it costs one more read of the "
                "weights. --no-verify-saved checks only the in-memory merged model"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA if present), cuda, cuda:N or cpu"})

    def __post_init__(self) -> None:
        model = Path(self.model_dir)
        if not model.is_dir():
            raise FileNotFoundError(f"--model-dir {self.model_dir}: folder not found")
        if not (model / "config.json").is_file():
            raise FileNotFoundError(f"--model-dir {self.model_dir}: no config.json there (not a model folder)")
        adapter = Path(self.adapter_dir)
        if not adapter.is_dir():
            raise FileNotFoundError(f"--adapter-dir {self.adapter_dir}: folder not found")
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (adapter / name).is_file():
                raise FileNotFoundError(
                    f"--adapter-dir {self.adapter_dir}: no {name} there (not a finished fine-tune output)")
        if self.dataset_dir is not None and not (Path(self.dataset_dir) / DATASET_MANIFEST).is_file():
            raise FileNotFoundError(
                f"--dataset-dir {self.dataset_dir}: no {DATASET_MANIFEST} there (not a complete prepared dataset)")
        if self.metrics_path is not None and not Path(self.metrics_path).is_file():
            raise FileNotFoundError(f"--metrics-path {self.metrics_path}: file not found")
        output = Path(self.output_dir).resolve()
        for flag, value in (("--model-dir", self.model_dir), ("--adapter-dir", self.adapter_dir),
                            ("--dataset-dir", self.dataset_dir)):
            if value is None:
                continue
            inputs = Path(value).resolve()
            # The export replaces --output-dir whole; it must never be, or hold, an input.
            if output == inputs or output in inputs.parents:
                raise ValueError(f"--output-dir {self.output_dir} would replace {flag} {value}; pick another folder")
        for flag, value in (("--tolerance", self.tolerance), ("--merge-tolerance", self.merge_tolerance)):
            if value is not None and not value >= 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        if self.verify_samples < 1:
            raise ValueError(f"--verify-samples must be at least 1, got {self.verify_samples}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}")
        if not SHARD_SIZE_PATTERN.match(self.max_shard_size.strip()):
            raise ValueError(f"--max-shard-size must look like 5GB, 500MB or a byte count, got {self.max_shard_size!r}")


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
    stand_in = Path(model_dir) / "tiny_model.json"
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


def default_tolerances(compute_dtype, save_dtype) -> tuple[float, float]:
    """(merge check bound, headline bound) for the dtypes involved; see the constants' comment."""
    import torch

    if compute_dtype == torch.bfloat16:
        return TOLERANCE_BF16_COMPUTE, TOLERANCE_BF16_COMPUTE
    return TOLERANCE_FP32, TOLERANCE_FP32 if save_dtype == torch.float32 else TOLERANCE_BF16_EXPORT


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
    """Logits on the CPU in the model's dtype (bf16 halves the host memory: a real Gemma 4 sample
    of ~550 tokens x 262,144 vocabulary is ~0.3 GB), one tensor per sample."""
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


def merge_adapter(peft_model):
    """The merged plain model (a seam the tests use to plant a wrong merge)."""
    return peft_model.merge_and_unload()


def save_weights(model, folder: Path, max_shard_size: str) -> None:
    """safetensors shards + config (a seam the tests use to plant a corrupted file)."""
    model.save_pretrained(folder, max_shard_size=max_shard_size)


def cast_weights_(model, dtype) -> None:
    """Cast the parameters and persistent buffers (what the files hold) in place.

    Not ``model.to(dtype)``: that also casts non-persistent buffers such as RoPE's ``inv_freq``,
    which transformers keeps in fp32 whatever the model dtype; in bf16 they lose their third
    digit (0.5623 -> 0.5625) and positions drift. Found by the save/load check: such a model
    differed from the reloaded export by 6e-2 in logits.
    """
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


def check_tolerance(what: str, comparison: dict, bound: float, bound_name: str) -> None:
    diff = comparison["max_abs_logit_diff"]
    if not diff <= bound:  # written so that NaN fails too
        raise ExportVerificationError(
            f"{what}: max |logit difference| {diff:.3g} is over {bound_name} {bound:g} "
            f"(relative {comparison['max_rel_logit_diff']:.3g}, argmax agreement "
            f"{comparison['argmax_agreement']:.4f}); the export was not written")


# --- model card ---------------------------------------------------------------------------------


HUB_ID = re.compile(r"^(?:hf://|https://huggingface\.co/)?([\w.-]+/[\w.-]+)/?$")


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return "`" + json.dumps(value) + "`"
    return str(value)


def model_card(meta: dict) -> str:
    base, adapter, data, verify = meta["base_model"], meta["adapter"], meta["dataset"], meta["verification"]
    hub = HUB_ID.match(base["source"] or "")
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text"]
    if hub:
        front += [f"base_model: {hub.group(1)}", "base_model_relation: finetune"]
    front += ["tags:", "  - gemma4", "  - lora", "  - merged", "  - image-classification", "---", ""]
    lines = front + [
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
        "## Base model",
        "",
        "| field | value |",
        "|---|---|",
        f"| source | {_fmt(base['source'] or base['model_dir'])} |",
        f"| revision | {_fmt(base['revision'])} |",
        f"| weights manifest sha256 | {_fmt(base['manifest_sha256'])} |",
    ]
    if base.get("stand_in"):
        lines.append(f"| note | {base['stand_in']} |")
    lines += [
        "",
        "## Adapter and training data",
        "",
        "| field | value |",
        "|---|---|",
        f"| adapter_model.safetensors sha256 | {adapter['adapter_model_sha256']} |",
        f"| adapter_config.json sha256 | {adapter['adapter_config_sha256']} |",
        f"| dataset manifest sha256 | {_fmt(data and data['manifest_sha256'])} |",
    ]
    lines += [f"| training {k.replace('_', ' ')} | {_fmt(v)} |" for k, v in adapter.get("train_summary", {}).items()]
    lines += [
        "",
        "## Hyperparameters",
        "",
        "| name | value |",
        "|---|---|",
    ]
    hyper = meta["hyperparameters"]
    lines += [f"| lora.{k} | {_fmt(v)} |" for k, v in hyper["lora"].items()]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in (hyper["finetune"] or {}).items()]
    lines += ["", "## Evaluation", ""]
    if meta["metrics"]:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in meta["metrics"].items()]
    else:
        lines.append("No evaluation metrics were given to the export step.")
    lines += [
        "",
        "## Merge verification",
        "",
        f"Logits of the {verify['verified']} against base + adapter (unmerged) on "
        f"{verify['inputs']}, in {verify['compute_dtype']} on {verify['device']}:",
        "",
        "| check | value | bound |",
        "|---|---|---|",
        f"| max abs logit diff, export vs base + adapter | {_fmt(meta['max_abs_logit_diff'])} | "
        f"{_fmt(meta['tolerance'])} |",
        f"| max rel logit diff (to the largest reference logit) | {_fmt(meta['max_rel_logit_diff'])} | |",
        f"| argmax agreement | {_fmt(verify['argmax_agreement'])} | |",
        f"| merge math: merged in memory vs base + adapter | {_fmt(verify['merge_max_abs_logit_diff'])} | "
        f"{_fmt(verify['merge_tolerance'])} |",
        f"| save/load: reloaded export vs weights written | {_fmt(verify['save_load_max_abs_logit_diff'])} | "
        f"{_fmt(verify['save_load_tolerance'])} |",
        f"| adapter effect: base vs base + adapter | {_fmt(verify['adapter_effect_max_abs_logit_diff'])} | |",
        "",
        f"Saved dtype: {meta['dtype']}.",
        "",
        f"Exported by gemma-pets {meta['project_version']} on {meta['created_at']}.",
        "Use of the weights is governed by the base model's license.",
        "",
    ]
    return "\n".join(lines)


# --- the step -----------------------------------------------------------------------------------


def run(config: MergeExportConfig) -> dict:
    import torch

    from components import modeling, prompting

    # Cheap reads first, so bad input fails before any model is loaded.
    metrics = read_metrics(config.metrics_path) if config.metrics_path else None
    adapter, hyperparameters = adapter_info(config.adapter_dir)
    base_info = base_model_info(config.model_dir)
    data_info = dataset_info(config.dataset_dir)
    device, _ = modeling.checked_device(config.device, "none")  # never 4-bit: see below
    dtype = modeling.compute_dtype(device)
    save_dtype = getattr(torch, config.save_dtype)
    default_merge, default_export = default_tolerances(dtype, save_dtype)
    merge_tolerance = default_merge if config.merge_tolerance is None else config.merge_tolerance
    tolerance = default_export if config.tolerance is None else config.tolerance

    processor = modeling.load_processor(config.model_dir)
    batches, inputs_described = verification_inputs(processor, config.dataset_dir, config.verify_samples)

    # Never merge into a 4-bit model: the base is reloaded unquantised in the compute dtype.
    base = modeling.load_model(config.model_dir, device, quantization="none")
    peft_model = load_adapter_strict(base, config.adapter_dir)
    reference = compute_logits(peft_model, batches, device)
    with peft_model.disable_adapter():
        adapter_effect = compare_logits(reference, compute_logits(peft_model, batches, device))
    merged = merge_adapter(peft_model)
    del peft_model, base
    merged_logits = compute_logits(merged, batches, device)
    in_memory = compare_logits(reference, merged_logits)
    print(f"merged in {str(dtype).removeprefix('torch.')}: max |logit diff| {in_memory['max_abs_logit_diff']:.3g} "
          f"versus base + adapter (adapter effect {adapter_effect['max_abs_logit_diff']:.3g})")
    check_tolerance("merged model in memory versus base + adapter", in_memory, merge_tolerance, "--merge-tolerance")

    with atomic_dir(config.output_dir) as tmp:
        cast_weights_(merged, save_dtype)
        merged.config.dtype = save_dtype  # config.json says what the shards hold
        save_weights(merged, tmp, config.max_shard_size)
        processor.save_pretrained(tmp)
        copied = []
        for name in COPIED_FROM_BASE:
            if (Path(config.model_dir) / name).is_file():
                shutil.copyfile(Path(config.model_dir) / name, tmp / name)
                copied.append(name)
        # The merged model holding exactly the weights written: back in the compute dtype, which
        # is exact (bf16 -> fp32 widens; fp32 saved from a bf16 model narrows back to its values).
        if save_dtype != dtype:
            cast_weights_(merged, dtype)
            saved_logits = compute_logits(merged, batches, device)
        else:
            saved_logits = merged_logits
        as_saved = compare_logits(reference, saved_logits)
        merged = None
        release_memory(device)
        if config.verify_saved:
            exported = modeling.load_model(str(tmp), device, quantization="none")
            exported_logits = compute_logits(exported, batches, device)
            exported = None
            release_memory(device)
            save_load = compare_logits(saved_logits, exported_logits)
            check_tolerance("saved export reloaded from disk versus the weights written", save_load,
                            SAVE_LOAD_TOLERANCE, "the save/load bound")
            final = compare_logits(reference, exported_logits)
        else:
            save_load, final = None, as_saved
        check_tolerance(f"{'saved export reloaded from disk' if config.verify_saved else 'merged model as saved'} "
                        "versus base + adapter", final, tolerance, "--tolerance")
        if adapter_effect["max_abs_logit_diff"] <= tolerance:
            print(f"warning: the adapter moves logits by at most {adapter_effect['max_abs_logit_diff']:.3g}, "
                  f"within --tolerance {tolerance:g}: the check cannot tell the merged model from the base "
                  "(an untrained adapter?)", file=sys.stderr)
        files = [
            {"path": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file() and (p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json"))
        ]
        meta = {
            "base_model": base_info,
            "adapter": adapter,
            "dataset": data_info,
            "hyperparameters": hyperparameters,
            "metrics": metrics,
            "max_abs_logit_diff": final["max_abs_logit_diff"],
            "max_rel_logit_diff": final["max_rel_logit_diff"],
            "tolerance": tolerance,
            "dtype": config.save_dtype,
            "verification": {
                "inputs": inputs_described,
                "samples": len(batches),
                "device": str(device),
                "compute_dtype": str(dtype).removeprefix("torch."),
                "verified": "saved export reloaded from disk" if config.verify_saved else
                            "in-memory merged model rounded to the save dtype (--no-verify-saved)",
                "tolerance_source": "--tolerance" if config.tolerance is not None else "default for the dtypes",
                "argmax_agreement": final["argmax_agreement"],
                "merge_max_abs_logit_diff": in_memory["max_abs_logit_diff"],
                "merge_tolerance": merge_tolerance,
                "save_load_max_abs_logit_diff": save_load and save_load["max_abs_logit_diff"],
                "save_load_tolerance": SAVE_LOAD_TOLERANCE,
                "adapter_effect_max_abs_logit_diff": adapter_effect["max_abs_logit_diff"],
            },
            "weights": files,
            "copied_from_base": copied,
            "max_shard_size": config.max_shard_size,
            "prompt_instruction": prompting.INSTRUCTION,
            "project_version": components.__version__,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        write_bytes_atomic(tmp / MODEL_CARD, model_card(meta).encode())
        write_json_atomic(tmp / METADATA_FILE, meta)  # last: marks the export complete
    print(f"wrote {config.output_dir}: {len(files)} weight file(s) in {config.save_dtype}, "
          f"max |logit diff| {final['max_abs_logit_diff']:.3g} <= {tolerance:g}")
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
