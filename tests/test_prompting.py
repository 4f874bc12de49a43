"""Training sequences: the served prompt token for token, then the answer and <turn|>, with the
loss only on those, under every chat-template shape."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from components import prompting
from tests.helpers import HISTORY_WITH_CHANNEL_TEMPLATE, model_with_chat_template

CLASSES = ["Abyssinian", "american_bulldog", "american_pit_bull_terrier", "pug", "great_pyrenees"]
ANSWERS = ["pug", "american_pit_bull_terrier", "Abyssinian"]


@pytest.fixture(scope="module")
def processors(tiny_model_dir, tiny_large_model_dir, tmp_path_factory):
    """One processor per chat-template shape: E2B/E4B, 31B/26B-A4B (the generation prompt has an
    empty thought channel that past model turns lack), and the reverse divergence."""
    from transformers import AutoProcessor

    diverging = model_with_chat_template(tiny_model_dir, tmp_path_factory.mktemp("template") / "model",
                                         HISTORY_WITH_CHANNEL_TEMPLATE)
    return {"small": AutoProcessor.from_pretrained(tiny_model_dir),
            "large": AutoProcessor.from_pretrained(tiny_large_model_dir),
            "history_with_channel": AutoProcessor.from_pretrained(diverging)}


def images():
    # Different aspect ratios expand to different numbers of image soft tokens.
    return [Image.new("RGB", (128, 128), (200, 30, 30)), Image.new("RGB", (320, 64), (0, 0, 200)),
            Image.new("RGB", (48, 200), (0, 150, 0))]


def expected_answer_ids(tokenizer, answer):
    return tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.convert_tokens_to_ids("<turn|>")]


def served_prompt(processor, image):
    """What a server using the template feeds the model: the template's own generation prompt
    (thinking off), tokenized by the processor with the image expanded; not via prompting."""
    content = [{"type": "image"}, {"type": "text", "text": prompting.instruction(CLASSES)}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return processor(text=[text], images=[[image]], return_tensors="pt")


def test_training_sequence_is_the_served_prompt_then_the_answer(processors):
    """On every template shape, also where past model turns render differently from the
    generation prompt: the tokens before the answer are the served prompt's, exactly."""
    for framing, processor in processors.items():
        batch = prompting.encode_training_batch(processor, images(), ANSWERS, CLASSES)
        for row, (image, answer) in enumerate(zip(images(), ANSWERS)):
            served = served_prompt(processor, image)
            n = served["input_ids"].shape[1]
            real = batch["attention_mask"][row].bool()
            assert batch["input_ids"][row][:n].tolist() == served["input_ids"][0].tolist(), framing
            assert batch["mm_token_type_ids"][row][:n].tolist() == served["mm_token_type_ids"][0].tolist(), framing
            assert batch["input_ids"][row][real][n:].tolist() == expected_answer_ids(processor.tokenizer, answer)
            assert (batch["labels"][row][:n] == prompting.IGNORE_INDEX).all(), framing
            torch.testing.assert_close(batch["pixel_values"][row], served["pixel_values"][0])


@pytest.mark.parametrize("framing", ["small", "large"])
def test_labels_are_exactly_answer_and_turn_close(processors, framing):
    processor = processors[framing]
    tok = processor.tokenizer
    batch = prompting.encode_training_batch(processor, images(), ANSWERS, CLASSES)
    ids, labels = batch["input_ids"], batch["labels"]
    n_image = (ids == tok.image_token_id).sum(dim=1)
    assert len(set(n_image.tolist())) == 3, "the three images should expand to different token counts"
    assert (batch["attention_mask"] == 0).any(), "the batch should need padding"
    assert (batch["attention_mask"][:, 0] == 1).all(), "training batches are padded on the right"
    for row, answer in enumerate(ANSWERS):
        kept = labels[row][labels[row] != -100].tolist()
        assert kept == expected_answer_ids(tok, answer)
        positions = (labels[row] != -100).nonzero().flatten()
        # One contiguous span closing the row's real tokens, after the last <|turn> and every image token.
        assert (positions.diff() == 1).all()
        assert int(positions.max()) + 1 == int(batch["attention_mask"][row].sum())
        last_turn = (ids[row] == tok.convert_tokens_to_ids("<|turn>")).nonzero().max()
        last_image = (ids[row] == tok.image_token_id).nonzero().max()
        assert positions.min() > last_turn and positions.min() > last_image
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


def test_bad_answers_and_lengths_are_refused(processors):
    processor = processors["small"]
    with pytest.raises(ValueError, match="has no tokens"):
        prompting.answer_ids(processor.tokenizer, "")
    with pytest.raises(ValueError, match="3 images but 2 answers"):
        prompting.encode_training_batch(processor, images(), ANSWERS[:2], CLASSES)
    with pytest.raises(ValueError, match="--max-length"):
        prompting.encode_training_batch(processor, images()[:1], ["pug"], CLASSES, max_length=16)


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
