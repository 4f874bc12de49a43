"""Random-init Gemma 4 of the real sizes, for speed and memory benchmarks.

Speed and memory do not depend on weight values, so a model built from a published config with
the real transformers classes (``Gemma4ForConditionalGeneration``) and random weights runs
exactly the kernels a downloaded checkpoint runs. The configs and the stand-in processor are
``components.random_model``'s (which writes such a model to disk); this module builds it in GPU
memory.

nf4 is made on the GPU, layer by layer, from the bf16 weights in memory, with the same
bitsandbytes storage ``modeling.nf4_config`` asks ``from_pretrained`` for (nf4, double-quantised
scales, bf16 compute and storage): no 62 GB checkpoint is written to disk for 31B.

Inputs come from the project's own prompt code and the real ``Gemma4Processor``; only the
tokenizer is the offline stand-in's BPE (``random_model.STAND_IN_VOCAB``): 510 tokens per 31B
sample (266 soft tokens for a 500x375 photo, prompt, answer; the recipe's measurement had 514).
"""

from __future__ import annotations

PHOTO_SIZE = (500, 375)  # (width, height) of a typical Oxford-IIIT Pet photo: 266 soft tokens


def build_model(config, device, quantization: str = "none"):
    """Random-init model on ``device`` in bf16, then (nf4) each linear layer quantised in place."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    with torch.device(device):
        # transformers' default attention, as modeling.load_model: sdpa, eager for the audio tower
        model = Gemma4ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    if torch.device(device).type == "cuda":
        from components.modeling import fuse_rms_norms

        fuse_rms_norms(model)  # as modeling.load_model does on CUDA
    if quantization == "nf4":
        quantize_nf4_(model)
    elif quantization != "none":
        raise ValueError(f"quantization must be nf4 or none, got {quantization!r}")
    return model


def quantize_nf4_(model) -> int:
    """Replace every nn.Linear but the LM head (tied to the embeddings) by bitsandbytes'
    Linear4bit, as ``from_pretrained`` with ``modeling.nf4_config()`` does. Returns the count."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    from components.modeling import nf4_config

    settings = nf4_config()
    count = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, nn.Linear) or full == "lm_head":
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None,
                compute_dtype=settings.bnb_4bit_compute_dtype, compress_statistics=settings.bnb_4bit_use_double_quant,
                quant_type=settings.bnb_4bit_quant_type, quant_storage=settings.bnb_4bit_quant_storage, device="meta",
            )
            weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, compress_statistics=settings.bnb_4bit_use_double_quant,
                quant_type=settings.bnb_4bit_quant_type, quant_storage=settings.bnb_4bit_quant_storage, module=layer,
            )
            layer.weight = weight._quantize(child.weight.device)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, layer)
            del child, weight
            count += 1
    # What transformers' bitsandbytes quantizer marks a loaded model with: Trainer then leaves
    # device placement alone, and PEFT treats the model as 4-bit, as with from_pretrained.
    from transformers.utils.quantization_config import QuantizationMethod

    model.is_loaded_in_4bit = True
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the bf16 weights' blocks back before anything is measured
    return count


def parameter_counts(model) -> dict:
    """Parameters by part, counting a 4-bit weight as its unpacked element count."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        n = p.numel()
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        if shape is not None:
            n = int(shape.numel())
        if ".embed_tokens" in name or "embed_tokens_per_layer" in name:
            part = "embeddings"
        elif name.startswith("model.language_model."):
            part = "language_model"
        elif name.startswith(("model.vision_tower.", "model.embed_vision.")):
            part = "vision"
        elif name.startswith(("model.audio_tower.", "model.embed_audio.")):
            part = "audio"
        else:
            part = "other"
        counts[part] = counts.get(part, 0) + n
    return counts
