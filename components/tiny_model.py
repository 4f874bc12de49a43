"""Offline stand-in: a tiny random-init Gemma 4 that loads exactly like a real checkpoint.

There is no Hugging Face hub here, so the demo and the tests run on a folder this module writes:
the real ``Gemma4ForConditionalGeneration`` (vision tower with clipped linears, per-layer inputs
and KV-shared layers like E2B), the real ``Gemma4Processor`` (image processor, audio feature
extractor, video processor), a small BPE tokenizer trained here that carries Gemma 4's special
tokens, and a chat template of the official shape (E2B/E4B's by default):

    <bos><|turn>user\\n<|image|>TEXT<turn|>\\n<|turn>model\\nANSWER<turn|>\\n

``--large-model-template`` gives the 31B / 26B-A4B template instead: past model turns as above,
but the generation prompt (thinking off) appends an empty thought channel
(``<|channel>thought\\n<channel|>``) after ``<|turn>model\\n``, so training and evaluation are
tested against a template whose history differs from its generation prompt.

    gemma-pets tiny-model --output-dir runs/tiny-gemma4
    AutoModelForMultimodalLM.from_pretrained("runs/tiny-gemma4")
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from components.artifacts import TINY_MODEL_INFO
from components.cli import entrypoint, parse_config
from components.files import atomic_dir

# Gemma 4's special tokens (shared/gemma4_variants.json, chat_framing). The first five keep the
# ids every Gemma checkpoint uses (pad 0, eos 1, bos 2, unk 3, mask 4).
BASE_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
TURN_OPEN, TURN_CLOSE = "<|turn>", "<turn|>"
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
MEDIA_TOKENS = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "video_token": "<|video|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
}
EXTRA_SPECIAL = [TURN_OPEN, TURN_CLOSE, CHANNEL_OPEN, CHANNEL_CLOSE, "<|think|>", *MEDIA_TOKENS.values()]

# Fine-tuning settings for the tiny model on CPU (the demo and the learning test): a random-init
# model needs a larger step than the recipe's real-checkpoint defaults; 5e-3 was at the edge of
# stability (the result swung with the seed and the CPU), 2e-3 is not (README "It learns").
# No LoRA dropout: its masks on every adapted layer's input cost 16% of a CPU step. 3 epochs:
# seeds 0-2 reach >= 0.9875 on both template shapes (2 epochs still gave 0.9875-1.000).
CPU_DEMO_FINETUNE = {
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "learning_rate": 2e-3,
    "epochs": 3,
    "batch_size": 8,
}

# A subset of the official Gemma 4 chat template; only the generation prompt differs by kind
# (31B / 26B-A4B open an empty thought channel). Sources of the shape: docs/steps.md.
CHAT_TEMPLATE = r"""
{%- macro strip_thinking(text) -%}
    {%- set kept = namespace(text='') -%}
    {%- for piece in text.split('<channel|>') -%}
        {%- set kept.text = kept.text + piece.split('<|channel>')[0] -%}
    {%- endfor -%}
    {{- kept.text | trim -}}
{%- endmacro -%}
{%- set thinking = enable_thinking is defined and enable_thinking -%}
{%- set loop_messages = messages -%}
{{- bos_token -}}
{%- if thinking or messages[0]['role'] in ['system', 'developer'] -%}
    {{- '<|turn>system\n' -}}
    {%- if thinking -%}{{- '<|think|>\n' -}}{%- endif -%}
    {%- if messages[0]['role'] in ['system', 'developer'] -%}
        {{- messages[0]['content'] | trim -}}
        {%- set loop_messages = messages[1:] -%}
    {%- endif -%}
    {{- '<turn|>\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{- '<|turn>' + role + '\n' -}}
    {%- if message['content'] is string -%}
        {{- strip_thinking(message['content']) if role == 'model' else message['content'] | trim -}}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{- strip_thinking(item['text']) if role == 'model' else item['text'] | trim -}}
            {%- elif item['type'] == 'image' -%}
                {{- '<|image|>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<turn|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|turn>model\n' -}}
    @EMPTY_THOUGHT_CHANNEL@
{%- endif -%}
"""
EMPTY_THOUGHT_CHANNEL = r"{%- if not thinking -%}{{- '<|channel>thought\n<channel|>' -}}{%- endif -%}"


def chat_template(large_model: bool = False) -> str:
    return CHAT_TEMPLATE.replace("@EMPTY_THOUGHT_CHANNEL@", EMPTY_THOUGHT_CHANNEL if large_model else "").strip()


@dataclass
class TinyModelConfig:
    """Write a tiny random-init Gemma 4 checkpoint folder (model, processor, tokenizer, template)."""

    output_dir: str = field(metadata={"help": "folder to write (replaced whole if it exists)"})
    seed: int = field(default=0, metadata={"help": "random seed of the weights"})
    hidden_size: int = field(default=64, metadata={"help": "language model width"})
    num_hidden_layers: int = field(default=4, metadata={"help": "language model depth"})
    vision_hidden_size: int = field(default=64, metadata={"help": "vision tower width"})
    vision_layers: int = field(default=2, metadata={"help": "vision tower depth"})
    vocab_size: int = field(default=768, metadata={"help": "BPE vocabulary size, special tokens included"})
    max_soft_tokens: int = field(
        default=70, metadata={"help": "image soft tokens per image (Gemma 4 allows 70/140/280/560/1120)"}
    )
    embedding_std: float = field(
        default=0.3, metadata={"help": "std of the token embeddings, which the LM head shares"}
    )
    large_model_template: bool = field(
        default=False,
        metadata={"help": "the 31B/26B-A4B chat template (its generation prompt has an empty thought channel)"},
    )

    def __post_init__(self) -> None:
        if self.max_soft_tokens not in (70, 140, 280, 560, 1120):
            raise ValueError(f"--max-soft-tokens must be one of 70, 140, 280, 560, 1120, got {self.max_soft_tokens}")
        if self.num_hidden_layers < 4:
            raise ValueError("--num-hidden-layers must be at least 4 (two of them are KV-shared, like E2B)")
        for name in ("hidden_size", "vision_hidden_size", "vision_layers", "vocab_size", "embedding_std"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")


def _tokenizer_corpus() -> list[str]:
    """Text the BPE is trained on: the task's own words, so class names get compact tokens."""
    from components.prepare_dataset import OXFORD_PET_CLASSES  # the 37 official class names

    names = list(OXFORD_PET_CLASSES)
    lines = [
        "What breed of pet is in this image? Answer with exactly one of these class names:",
        "Classify the image. Options: " + ", ".join(names),
        "The quick brown fox jumps over the lazy dog. A cat, a dog, a pet, an animal.",
        "Answer: Unknown. unknown breed, species, cat, dog, image, photo, picture, thought",
    ]
    lines += names + [n.replace("_", " ") for n in names] + [n.lower() for n in names]
    lines += ["user\nmodel\nthought\n"]  # the chat template's role and channel words
    return lines * 8


def build_tokenizer(vocab_size: int):
    """Train a small byte-fallback BPE with Gemma's pipeline and wrap it as the real GemmaTokenizer."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    # Gemma's BPE falls back to <0xNN> byte tokens for anything unseen; keep all 256 in the vocab.
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    raw = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    raw.normalizer = normalizers.Replace(" ", "▁")
    # Training only: split at newlines and before each word so no merge spans "\n" + text or two
    # words. GemmaTokenizer applies the merges to whole strings; with no such merge learned, the
    # newline closing "<|turn>model\n" can never fuse with the first token of the answer.
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Split("▁", "merged_with_next")]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=BASE_SPECIAL + EXTRA_SPECIAL + byte_tokens, show_progress=False
    )
    raw.train_from_iterator(_tokenizer_corpus(), trainer)
    bpe = json.loads(raw.to_str())["model"]
    tokenizer = GemmaTokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(m) for m in bpe["merges"]],
        # Named media tokens: Gemma4Processor reads tokenizer.image_token, .boi_token, ...
        extra_special_tokens=dict(MEDIA_TOKENS),
    )
    # Turn and channel markers must stay single, unsplittable tokens, as in the real vocabulary.
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in EXTRA_SPECIAL], special_tokens=True)
    tokenizer.padding_side = "left"
    return tokenizer


def vocab_rows(tokenizer) -> int:
    """Embedding rows needed: every id the tokenizer can emit, added tokens included."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def build_model_config(cfg: TinyModelConfig, tokenizer):
    from transformers import Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

    n = cfg.num_hidden_layers
    # E2B's pattern in miniature: sliding layers with a full-attention layer closing each block,
    # and the last two layers reusing earlier layers' key/value states (KV sharing).
    layer_types = ["sliding_attention"] * n
    layer_types[n // 2 - 1] = "full_attention"
    layer_types[-1] = "full_attention"
    text = Gemma4TextConfig(
        vocab_size=vocab_rows(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 2,
        num_hidden_layers=n,
        layer_types=layer_types,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        global_head_dim=32,
        hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=vocab_rows(tokenizer),
        num_kv_shared_layers=2,
        sliding_window=512,  # as E2B: the answer position must see the image tokens from sliding layers too
        max_position_embeddings=4096,
        final_logit_softcapping=30.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = Gemma4VisionConfig(
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=cfg.vision_hidden_size * 2,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=cfg.vision_hidden_size // 2,
        global_head_dim=cfg.vision_hidden_size // 2,
        patch_size=16,
        pooling_kernel_size=3,
        # Patch positions index this table per axis; with 70 soft tokens (630 patches) one side
        # is at most 630 // 9 * 3 = 210 patches long, so 256 rows cover every aspect ratio.
        position_embedding_size=256,
        default_output_length=cfg.max_soft_tokens,
        use_clipped_linears=True,
    )
    return Gemma4Config(text_config=text, vision_config=vision, audio_config=None, tie_word_embeddings=True,
                        **media_token_ids(tokenizer))


def media_token_ids(tokenizer) -> dict[str, int]:
    """Gemma4Config's media token id fields, from the tokenizer's media tokens."""
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in MEDIA_TOKENS.items()}
    return {"image_token_id": ids["image_token"], "boi_token_id": ids["boi_token"], "eoi_token_id": ids["eoi_token"],
            "video_token_id": ids["video_token"], "audio_token_id": ids["audio_token"],
            "boa_token_id": ids["boa_token"], "eoa_token_index": ids["eoa_token"]}


def set_clip_ranges(model, generator) -> int:
    """Give every clipped linear finite, slightly different bounds, as real checkpoints have.

    Random init leaves them at +-inf, which would make clipping a no-op and the test that LoRA
    keeps the clipping around the adapted layer unable to fail. Returns how many were set.
    """
    import torch
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    count = 0
    for module in model.modules():
        if isinstance(module, Gemma4ClippableLinear) and module.use_clipped_linears:
            lo, hi = 2.0 + torch.rand(2, generator=generator)
            module.input_min.fill_(-float(lo))
            module.input_max.fill_(float(lo))
            module.output_min.fill_(-float(hi))
            module.output_max.fill_(float(hi))
            count += 1
    return count


def balance_vision_path(model, processor, embedding_std: float, generator) -> float:
    """Give the random vision path a trained model's proportions, so the LM sees the image (at
    transformers' init it barely does: docs/steps.md); returns the projection's gain."""
    import torch
    from PIL import Image

    patches = model.model.vision_tower.patch_embedder
    with torch.no_grad():
        patches.position_embedding_table.normal_(0.0, 0.02, generator=generator)
        patches.input_proj.weight.normal_(0.0, 0.1, generator=generator)
        colours = torch.randint(0, 256, (8, 3), generator=generator).tolist()
        batch = processor.image_processor([Image.new("RGB", (64, 64), tuple(c)) for c in colours], return_tensors="pt")
        features = model.model.get_image_features(batch["pixel_values"], batch["image_position_ids"], return_dict=True)
        image_rms = torch.cat(list(features.pooler_output)).pow(2).mean().sqrt()
        # Gemma scales token embeddings by sqrt(hidden size) on the way in.
        text_rms = embedding_std * model.config.text_config.hidden_size**0.5
        gain = float(text_rms / image_rms)
        model.model.embed_vision.embedding_projection.weight.mul_(gain)
    return gain


def build_processor(tokenizer, max_soft_tokens: int, large_model: bool):
    from transformers import (
        Gemma4AudioFeatureExtractor,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4VideoProcessor,
    )

    return Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(patch_size=16, max_soft_tokens=max_soft_tokens, pooling_kernel_size=3),
        tokenizer=tokenizer,
        video_processor=Gemma4VideoProcessor(),
        chat_template=chat_template(large_model),
        image_seq_length=max_soft_tokens,
    )


def run(cfg: TinyModelConfig) -> dict:
    import torch
    from transformers import Gemma4ForConditionalGeneration, GenerationConfig

    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(cfg.vocab_size)
    model_config = build_model_config(cfg, tokenizer)
    model = Gemma4ForConditionalGeneration(model_config).eval()
    clipped = set_clip_ranges(model, torch.Generator().manual_seed(cfg.seed))
    # Wider token embeddings than initializer_range: with the tied LM head at 0.02 std every logit
    # is capped near 1.3 and the loss stalls (docs/steps.md).
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, cfg.embedding_std, generator=torch.Generator().manual_seed(cfg.seed))
    # Real checkpoints ship bf16 weights; so does this one (and it halves the folder's size).
    processor = build_processor(tokenizer, cfg.max_soft_tokens, cfg.large_model_template)
    gain = balance_vision_path(model, processor, cfg.embedding_std, torch.Generator().manual_seed(cfg.seed))
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # A turn ends the answer: generation stops at <turn|> as well as at <eos>.
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(TURN_CLOSE)],
        do_sample=False,
    )
    with atomic_dir(cfg.output_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        info = {
            "stand_in": "tiny random-init Gemma 4 (components.tiny_model)",
            "vision_projection_gain": gain,
            "options": dataclasses.asdict(cfg),
            "parameters": sum(p.numel() for p in model.parameters()),
            "clipped_linears": clipped,
        }
        (tmp / TINY_MODEL_INFO).write_text(json.dumps(info, indent=2) + "\n")
    size = sum(p.stat().st_size for p in Path(cfg.output_dir).rglob("*") if p.is_file())
    info["folder_bytes"] = size
    print(f"wrote {cfg.output_dir}: {info['parameters']:,} parameters, {size / 1e6:.2f} MB")
    return info


@entrypoint
def main(argv: list[str] | None = None) -> int:
    run(parse_config(TinyModelConfig, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
