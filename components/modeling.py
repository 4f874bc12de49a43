"""Loading Gemma 4 the same way in every step: device, dtype, 4-bit nf4, LoRA targets.

Fine-tuning, evaluation and merging all go through these functions so a model folder (a staged
hub checkpoint, the tiny stand-in, or a merged export) loads identically everywhere.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch
from torch import nn

from components.artifacts import ADAPTER_CONFIG

# Parts of Gemma4ForConditionalGeneration whose linear layers get LoRA: the language model, the
# vision tower and the projection that feeds image soft tokens into the language model. The
# lm_head (tied to the embeddings) and any audio tower are left alone.
LORA_SCOPES = ("model.language_model.", "model.vision_tower.", "model.embed_vision.")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (what the checkpoints ship and the tensor cores want); fp32 on CPU, where
    bf16 matmuls are slow and lose precision the tiny CPU runs would notice."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_quantization(quantization: str, device: torch.device) -> str:
    if quantization == "auto":
        quantization = "nf4" if device.type == "cuda" else "none"
    if quantization == "nf4" and device.type != "cuda":
        raise ValueError("--quantization nf4 needs a CUDA GPU (bitsandbytes 4-bit); use --quantization none on CPU")
    if quantization not in ("nf4", "none"):
        raise ValueError(f"--quantization must be auto, nf4 or none, got {quantization!r}")
    if quantization == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--quantization nf4 needs bitsandbytes, which this install lacks: pip install "
                         "'gemma-pets[gpu]' (the trainer image has it), or --quantization none")
    return quantization


def checked_device(device: str, quantization: str) -> tuple[torch.device, str]:
    """(device, quantization) for the --device and --quantization flags, or a UserError naming
    the flag: checked before any model is loaded."""
    from components.cli import UserError

    try:
        picked = pick_device(device)
    except RuntimeError as err:
        raise UserError(f"--device {device!r} is not a device torch knows ({err})") from None
    if picked.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    try:
        return picked, resolve_quantization(quantization, picked)
    except ValueError as err:
        raise UserError(str(err)) from None


def nf4_config():
    """QLoRA's storage: nf4 weights, double-quantised scales, bf16 compute and bf16 quant storage
    (bf16 storage lets FSDP shard the packed weights like any bf16 tensor)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )


def check_model_dir(model_dir: str, flag: str = "--model-dir") -> Path:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {model_dir}: no config.json there (not a model folder)")
    return path


def load_processor(model_dir: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


def load_model(model_dir: str, device: torch.device, quantization: str = "none",
               dtype: torch.dtype | str | None = None):
    """The base model on ``device``: 4-bit nf4 (QLoRA) or unquantised in ``dtype`` (default the
    compute dtype; "auto": the dtype the folder was saved in).

    Attention is transformers' default: sdpa for the language model and vision tower, eager for
    the E2B/E4B audio tower, which has no sdpa path (asking for sdpa everywhere fails there)."""
    from transformers import AutoModelForMultimodalLM

    check_model_dir(model_dir)
    kwargs = dict(dtype=dtype or compute_dtype(device))
    if quantization == "nf4":
        kwargs["quantization_config"] = nf4_config()
        kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForMultimodalLM.from_pretrained(model_dir, **kwargs)
    if quantization != "nf4":
        model.to(device)
    if device.type == "cuda":
        fuse_rms_norms(model)
    return model


def output_logits(causal_lm, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the LM head for the given hidden states, Gemma's final softcap applied: for
    callers that pick the positions themselves (the full [batch, seq, 262k] tensor is large)."""
    logits = causal_lm.lm_head(hidden).float()
    softcap = causal_lm.config.get_text_config().final_logit_softcapping
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _fused_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return nn.functional.rms_norm(hidden_states, (hidden_states.shape[-1],),
                                  self.weight if self.with_scale else None, self.eps)


def fuse_rms_norms(model: nn.Module, enabled: bool = True) -> int:
    """Run each Gemma4RMSNorm as torch's fused RMSNorm kernel (``enabled=False`` undoes it);
    returns the number of norms. Same result, one kernel instead of seven elementwise ones with
    fp32 copies (tests/test_modeling.py compares; speed: docs/benchmarks.md#fused-rmsnorm)."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

    count = 0
    for module in model.modules():
        if isinstance(module, Gemma4RMSNorm):
            if enabled:
                module.forward = types.MethodType(_fused_rms_norm, module)
            else:
                module.__dict__.pop("forward", None)
            count += 1
    return count


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # bitsandbytes' 4-bit layer is not an nn.Linear subclass in every release; one exists only
    # once bitsandbytes is imported (CPU installs do not have it: the gpu extra).
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def lora_target_modules(model: nn.Module) -> list[str]:
    """Full names of every linear layer of the language model, vision tower and vision projection.

    Inside Gemma4ClippableLinear the target is the inner ``.linear``, so PEFT wraps that layer and
    the clamps before and after it keep working around base + adapter.
    """
    names = [
        name
        for name, module in model.named_modules()
        if name.startswith(LORA_SCOPES) and _is_linear(module)
    ]
    if not names:
        raise ValueError("found no linear layers to adapt: is this a Gemma 4 model?")
    return names


def load_with_adapter(model_dir: str, adapter_dir: str, device: torch.device, quantization: str = "none",
                      dtype: torch.dtype | str | None = None):
    """Base + LoRA adapter (unmerged), for evaluating a fine-tuned adapter."""
    from peft import PeftModel

    if not (Path(adapter_dir) / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"--adapter-dir {adapter_dir}: no {ADAPTER_CONFIG} there")
    base = load_model(model_dir, device, quantization, dtype)
    return PeftModel.from_pretrained(base, adapter_dir).eval()
