"""The tiny stand-in must load and behave like a real Gemma 4 checkpoint folder."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from components import tiny_model


def test_loads_through_auto_classes(tiny_model_dir):
    from transformers import AutoModelForMultimodalLM, AutoProcessor, Gemma4ForConditionalGeneration, Gemma4Processor

    model = AutoModelForMultimodalLM.from_pretrained(tiny_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    assert isinstance(model, Gemma4ForConditionalGeneration)
    assert isinstance(processor, Gemma4Processor)
    assert model.config.vision_config.use_clipped_linears
    assert model.config.text_config.num_kv_shared_layers > 0
    # The config's media token ids are the tokenizer's.
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image|>")
    assert model.config.boi_token_id == tok.convert_tokens_to_ids("<|image>")
    assert model.config.eoi_token_id == tok.convert_tokens_to_ids("<image|>")
    assert model.generation_config.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids("<turn|>")]


def test_folder_is_small(tiny_model_dir):
    size = sum(p.stat().st_size for p in Path(tiny_model_dir).rglob("*") if p.is_file())
    assert size < 5 * 2**20


def test_chat_templates_have_the_official_shapes(tiny_model_dir, tiny_large_model_dir):
    """Both kinds render history the official way (past model turns without thought channels);
    only the generation prompt differs: E2B/E4B end at <|turn>model\n, 31B/26B-A4B add an empty
    thought channel unless thinking is on (then <|think|> opens a system turn instead)."""
    from transformers import AutoProcessor

    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Which breed? "}]}
    answer = {"role": "assistant", "content": [{"type": "text", "text": "<|channel>thought\nfur<channel|>pug"}]}
    user_turn = "<|turn>user\n<|image|>Which breed?<turn|>\n"
    history = user_turn + "<|turn>model\npug<turn|>\n"
    generation = {"small": "<|turn>model\n", "large": "<|turn>model\n<|channel>thought\n<channel|>"}
    for kind, folder in (("small", tiny_model_dir), ("large", tiny_large_model_dir)):
        processor = AutoProcessor.from_pretrained(folder)
        render = processor.apply_chat_template
        assert render([user, answer], tokenize=False) == "<bos>" + history, kind
        assert render([user, answer, user], tokenize=False, add_generation_prompt=True) == (
            "<bos>" + history + user_turn + generation[kind]), kind
        system = {"role": "system", "content": " Be brief. "}
        assert render([system, user], tokenize=False, add_generation_prompt=True) == (
            "<bos><|turn>system\nBe brief.<turn|>\n" + user_turn + generation[kind]), kind
        assert render([user], tokenize=False, add_generation_prompt=True, enable_thinking=True) == (
            "<bos><|turn>system\n<|think|>\n<turn|>\n" + user_turn + "<|turn>model\n"), kind


def test_special_tokens_stay_whole(tiny_model_dir):
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    text = "<|turn>model\n<|channel>thought\n<channel|>pug<turn|>\n"
    pieces = tok.tokenize(text)
    for special in ("<|turn>", "<|channel>", "<channel|>", "<turn|>"):
        assert special in pieces
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_forward_and_generate_on_an_image(tiny_model_dir):
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    model = AutoModelForMultimodalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which breed?"}]}],
        tokenize=False, add_generation_prompt=True,
    )
    batch = processor(text=[text], images=[[Image.new("RGB", (96, 64), (10, 200, 30))]], return_tensors="pt")
    n_image_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens > 0
    with torch.inference_mode():
        logits = model(**batch).logits
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert logits.shape[-1] == model.config.text_config.vocab_size
    assert torch.isfinite(logits).all()
    assert out.shape[1] > batch["input_ids"].shape[1]


def test_clipped_linears_have_finite_bounds(tiny_model_dir):
    from transformers import AutoModelForMultimodalLM
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    model = AutoModelForMultimodalLM.from_pretrained(tiny_model_dir)
    clipped = [m for m in model.modules() if isinstance(m, Gemma4ClippableLinear)]
    assert clipped
    for m in clipped:
        assert math.isfinite(float(m.input_max)) and math.isfinite(float(m.output_max))


def test_bad_options_are_rejected():
    import pytest

    with pytest.raises(ValueError, match="--max-soft-tokens"):
        tiny_model.TinyModelConfig(output_dir="x", max_soft_tokens=64)


def test_vision_path_carries_the_image_at_text_scale(tiny_model_dir):
    """Soft tokens of different images differ, and reach the LM at the RMS of text embeddings."""
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    model = AutoModelForMultimodalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    images = [Image.new("RGB", (64, 64), colour) for colour in ((230, 20, 20), (20, 20, 230))]
    batch = processor.image_processor(images, return_tensors="pt")
    with torch.no_grad():
        red, blue = model.model.get_image_features(batch["pixel_values"], batch["image_position_ids"],
                                                   return_dict=True).pooler_output
    cosine = torch.nn.functional.cosine_similarity(red.mean(0), blue.mean(0), dim=0)
    assert cosine < 0.8
    embed = model.get_input_embeddings()
    text_rms = (embed.weight * embed.embed_scale).pow(2).mean().sqrt()
    image_rms = torch.cat([red, blue]).pow(2).mean().sqrt()
    assert 0.5 < float(image_rms / text_rms) < 2.0
