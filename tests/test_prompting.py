"""Label masks: loss only on the answer and its closing <turn|>, under every framing and padding."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from components import prompting

CLASSES = ["Abyssinian", "american_bulldog", "american_pit_bull_terrier", "pug", "great_pyrenees"]


@pytest.fixture(scope="module")
def processors(tiny_model_dir, tiny_large_model_dir):
    from transformers import AutoProcessor

    return {"small": AutoProcessor.from_pretrained(tiny_model_dir),
            "large": AutoProcessor.from_pretrained(tiny_large_model_dir)}


def images():
    # Different aspect ratios expand to different numbers of image soft tokens.
    return [Image.new("RGB", (128, 128), (200, 30, 30)), Image.new("RGB", (320, 64), (0, 0, 200)),
            Image.new("RGB", (48, 200), (0, 150, 0))]


def expected_answer_ids(tokenizer, answer):
    return tokenizer(answer + "<turn|>", add_special_tokens=False).input_ids


@pytest.mark.parametrize("framing", ["small", "large"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_labels_are_exactly_answer_and_turn_close(processors, framing, padding_side):
    processor = processors[framing]
    tok = processor.tokenizer
    answers = ["pug", "american_pit_bull_terrier", "Abyssinian"]
    batch = prompting.encode_training_batch(processor, images(), answers, CLASSES, padding_side=padding_side)
    ids, labels = batch["input_ids"], batch["labels"]
    n_image = (ids == tok.image_token_id).sum(dim=1)
    assert len(set(n_image.tolist())) == 3, "the three images should expand to different token counts"
    pad_rows = (batch["attention_mask"] == 0).any(dim=1)
    assert pad_rows.any(), "the batch should need padding"
    for row, answer in enumerate(answers):
        kept = labels[row][labels[row] != -100].tolist()
        assert kept == expected_answer_ids(tok, answer)
        positions = (labels[row] != -100).nonzero().flatten()
        # One contiguous span, after the last <|turn> and after every image token.
        assert (positions.diff() == 1).all()
        last_turn = (ids[row] == tok.convert_tokens_to_ids("<|turn>")).nonzero().max()
        last_image = (ids[row] == tok.image_token_id).nonzero().max()
        assert positions.min() > last_turn and positions.min() > last_image
        # Never on padding, never on the thought channel.
        assert (batch["attention_mask"][row][positions] == 1).all()
        assert tok.convert_tokens_to_ids("<channel|>") not in kept


def test_class_name_also_in_prompt_list_is_masked_there(processors):
    processor = processors["small"]
    tok = processor.tokenizer
    batch = prompting.encode_training_batch(processor, images()[:1], ["great_pyrenees"], CLASSES)
    text = tok.decode(batch["input_ids"][0])
    assert text.count("great_pyrenees") == 2  # once in the class list, once as the answer
    supervised = tok.decode(batch["labels"][0][batch["labels"][0] != -100])
    assert supervised == "great_pyrenees<turn|>"


def test_large_framing_prompt_ends_with_empty_thought_channel(processors):
    text = prompting.prompt_text(processors["large"], CLASSES)
    assert text.endswith("<|turn>model\n<|channel>thought\n<channel|>")
    full = prompting.training_text(processors["large"], CLASSES, "pug")
    assert full.startswith(text), "training text must extend exactly the generation prompt"


def test_errors_for_truncated_or_unanswered_sequences(processors):
    tok = processors["small"].tokenizer
    no_close = tok("<bos><|turn>user\nhi<turn|>\n<|turn>model\npug", add_special_tokens=False).input_ids
    with pytest.raises(ValueError, match="not closed"):
        prompting.answer_span(no_close, tok)
    user_last = tok("<bos><|turn>user\nhi<turn|>\n", add_special_tokens=False).input_ids
    with pytest.raises(ValueError, match="not the model"):
        prompting.answer_span(user_last, tok)


def test_max_length_is_enforced_with_a_clear_error(processors):
    with pytest.raises(ValueError, match="--max-length"):
        prompting.encode_training_batch(processors["small"], images()[:1], ["pug"], CLASSES, max_length=16)


def test_prompt_batch_is_left_padded(processors):
    batch = prompting.encode_prompt_batch(processors["small"], images(), CLASSES)
    assert (batch["attention_mask"][:, -1] == 1).all()
    assert torch.equal(batch["input_ids"][:, -1], batch["input_ids"][0, -1].expand(3))


def test_prefetched_keeps_order_and_raises_at_the_failing_item():
    import threading

    threads = []

    def square(x):
        threads.append(threading.current_thread().name)
        if x == 3:
            raise ValueError("bad item 3")
        return x * x

    assert list(prompting.prefetched(square, range(3))) == [0, 1, 4]
    assert all(name.startswith("prefetch") for name in threads)  # the work ran off the caller's thread
    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for value in prompting.prefetched(square, range(6)):
            got.append(value)
    assert got == [0, 1, 4]
    assert list(prompting.prefetched(square, [])) == []
