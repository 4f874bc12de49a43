"""Random-init Gemma 4 of a published size, written to disk as a downloaded checkpoint is.

The real-size stand-in for rehearsals (no hub here): the real transformers classes built from a
published config (``gemma4_variants.json``), random bf16 weights, and the tiny stand-in's tokenizer
and chat template. Speed, memory and file sizes do not depend on the weight values.
``--layers N`` keeps the published widths at fewer layers (docs/steps.md).

    gemma-pets random-model --variant gemma-4-31b --layers 12 --output-dir weights/
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from components.artifacts import RANDOM_MODEL_INFO
from components.cli import parse_config
from components.files import atomic_dir

VARIANTS_FILE = Path(__file__).with_name("gemma4_variants.json")
LARGE_TEMPLATE_VARIANTS = ("gemma-4-31b", "gemma-4-26b-a4b")  # the empty-thought-channel template
# BPE size of the stand-in tokenizer that makes the 37-name prompt + one 500x375 image + answer as
# long in tokens as with Gemma's own tokenizer (~510 per 31B sample; the recipe measured 514).
STAND_IN_VOCAB = 510


def load_variants(path: Path = VARIANTS_FILE) -> dict:
    return json.loads(Path(path).read_text())


def _variant(name: str, path: Path) -> tuple[dict, dict]:
    published = load_variants(path)
    if name not in published["variants"]:
        raise ValueError(f"--variant {name!r}: not in {path} (choose from {', '.join(published['variants'])})")
    return published, published["variants"][name]


def text_settings(text: dict, layers: int | None) -> dict:
    """Gemma4TextConfig keywords at ``layers`` layers (None: the published depth)."""
    text = dict(text)
    unit, repeat = text.pop("layer_types_unit"), text.pop("layer_types_repeat")
    if layers is not None:
        if layers < len(unit) or layers % len(unit) or layers > len(unit) * repeat:
            raise ValueError(f"--layers must be a multiple of the layer-type unit ({len(unit)} layers) "
                             f"between {len(unit)} and {len(unit) * repeat}, got {layers}")
        units = layers // len(unit)
        # The KV-shared tail is whole units of the published model (E2B 4 of 7, E4B 3 of 7);
        # keep that share, with at least one unit computing its own keys and values.
        shared_units = text["num_kv_shared_layers"] // len(unit)
        text["num_kv_shared_layers"] = min(units - 1, round(units * shared_units / repeat)) * len(unit)
        repeat = units
    text["layer_types"] = unit * repeat
    text["num_hidden_layers"] = len(text["layer_types"])
    return text


def variant_config(name: str, tokenizer, layers: int | None = None, path: Path = VARIANTS_FILE):
    """The Gemma4Config of a published variant, with the media token ids of ``tokenizer``."""
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

    from components.tiny_model import media_token_ids

    published, variant = _variant(name, path)
    text_config = Gemma4TextConfig(
        **text_settings(variant["text"], layers),
        rope_parameters=published["rope_parameters"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision_config = Gemma4VisionConfig(**published["vision"][variant["vision"]])
    audio_config = Gemma4AudioConfig() if variant["audio"] == "default" else None
    return Gemma4Config(text_config=text_config, vision_config=vision_config, audio_config=audio_config,
                        tie_word_embeddings=True, **media_token_ids(tokenizer))


def stand_in_processor(name: str, path: Path = VARIANTS_FILE):
    """The real Gemma4Processor at the variant's soft-token budget and template kind, with the
    stand-in tokenizer."""
    from components import tiny_model

    _, variant = _variant(name, path)
    tokenizer = tiny_model.build_tokenizer(STAND_IN_VOCAB)
    return tiny_model.build_processor(tokenizer, variant["vision_soft_tokens_per_image"],
                                      name in LARGE_TEMPLATE_VARIANTS)


@dataclass
class RandomModelConfig:
    """Write a random-init Gemma 4 checkpoint folder of a published size."""

    variant: str = field(metadata={"help": "published config to build", "choices": list(load_variants()["variants"])})
    output_dir: str = field(metadata={"help": "folder to write (replaced whole if it exists)"})
    layers: int | None = field(default=None, metadata={
        "help": "language-model layers (a multiple of the layer-type unit: 5 for E2B, 6 for the others); "
                "default: the published depth"})
    seed: int = field(default=0, metadata={"help": "random seed of the weights"})
    max_shard_size: str = field(default="5GB", metadata={"help": "largest safetensors shard"})
    device: str = field(default="auto", metadata={
        "help": "where the weights are initialised: auto = CUDA when available (on the CPU, bf16 init "
                "of 21.5 GB took about 9 minutes on one H200 machine: docs/rehearsal.md)"})

    def __post_init__(self) -> None:
        _, variant = _variant(self.variant, VARIANTS_FILE)
        if self.layers is not None:
            text_settings(variant["text"], self.layers)  # raises on a depth the pattern cannot take


def init_model(config, device: str):
    """The model of ``config`` with transformers' own initialisation (normal, std
    initializer_range), made in bf16: one copy. Built without torch's per-layer default init,
    which that initialisation overwrites anyway (a third of the CPU time: docs/rehearsal.md)."""
    import torch
    from transformers import Gemma4ForConditionalGeneration
    from transformers.initialization import no_init_weights

    from components import modeling

    with modeling.pick_device(device):
        with no_init_weights():
            model = Gemma4ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
        model.init_weights()
    return model.eval()


def run(cfg: RandomModelConfig) -> dict:
    import torch
    from transformers import GenerationConfig

    from components.tiny_model import TURN_CLOSE

    torch.manual_seed(cfg.seed)
    processor = stand_in_processor(cfg.variant)
    tokenizer = processor.tokenizer
    config = variant_config(cfg.variant, tokenizer, cfg.layers)
    model = init_model(config, cfg.device)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(TURN_CLOSE)], do_sample=False)
    info = {
        "stand_in": f"random-init {cfg.variant} (components.random_model), "
                    f"{config.text_config.num_hidden_layers} language-model layers",
        "variant": cfg.variant,
        "layers": config.text_config.num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seed": cfg.seed,
        "initialised_on": str(next(model.parameters()).device.type),
    }
    with atomic_dir(cfg.output_dir) as tmp:
        model.save_pretrained(tmp, max_shard_size=cfg.max_shard_size)
        del model
        processor.save_pretrained(tmp)
        (tmp / RANDOM_MODEL_INFO).write_text(json.dumps(info, indent=2) + "\n")
    info["folder_bytes"] = sum(p.stat().st_size for p in Path(cfg.output_dir).rglob("*") if p.is_file())
    print(f"wrote {cfg.output_dir}: {info['parameters']:,} parameters, {info['folder_bytes'] / 1e9:.2f} GB")
    return info


def main(argv: list[str] | None = None) -> int:
    run(parse_config(RandomModelConfig, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
