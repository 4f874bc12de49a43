"""The one prompt and label recipe shared by fine-tuning and evaluation.

A sample is one user turn holding the image first, then the instruction with the list of class
names; the model's answer is the class name. Training and evaluation build the prompt with the
same functions here, so what is measured is what was trained.

Loss falls only on the answer and the closing ``<turn|>``. The answer span is found from the
chat template's structure in the token ids of the whole rendered conversation (the last
``<|turn>`` whose role is ``model``, past its newline and an optional empty thought channel, up
to the next ``<turn|>``), never by re-tokenising the prompt alone: that would shift when a BPE
merge crosses the prompt/answer boundary, when images expand to a variable number of soft
tokens, or under left padding.
"""

from __future__ import annotations

import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")
U = TypeVar("U")

IGNORE_INDEX = -100  # label value that cross-entropy skips
TURN_OPEN, TURN_CLOSE = "<|turn>", "<turn|>"
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
MODEL_ROLE = "model"

INSTRUCTION = "What breed of pet is in this image? Answer with exactly one of these class names: {choices}."


def instruction(class_names: Sequence[str]) -> str:
    return INSTRUCTION.format(choices=", ".join(class_names))


def conversation(class_names: Sequence[str], answer: str | None = None) -> list[dict]:
    """Chat messages for one sample: image first, then the instruction; optional answer turn."""
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": instruction(class_names)}],
        }
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def prompt_text(processor, class_names: Sequence[str]) -> str:
    """Rendered prompt ending with the generation prompt (the model's turn is open)."""
    return processor.apply_chat_template(
        conversation(class_names), tokenize=False, add_generation_prompt=True
    )


def training_text(processor, class_names: Sequence[str], answer: str) -> str:
    """Rendered conversation with the answer turn closed by ``<turn|>``."""
    return processor.apply_chat_template(conversation(class_names, answer), tokenize=False)


class _TemplateTokens:
    """Ids of the template's structural tokens for one tokenizer (cached per tokenizer)."""

    def __init__(self, tokenizer):
        ids = tokenizer.convert_tokens_to_ids([TURN_OPEN, TURN_CLOSE, CHANNEL_OPEN, CHANNEL_CLOSE])
        if ids[0] in (None, tokenizer.unk_token_id) or ids[1] in (None, tokenizer.unk_token_id):
            raise ValueError(f"tokenizer has no {TURN_OPEN} / {TURN_CLOSE} tokens: not a Gemma 4 chat tokenizer")
        self.turn_open, self.turn_close, self.channel_open, self.channel_close = ids
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        if token_id not in self._text:
            self._text[token_id] = self.tokenizer.decode([token_id])
        return self._text[token_id]


# Keyed by the tokenizer object itself, not id(): an id can be reused by a later tokenizer with
# other token ids once the first is garbage-collected.
_TOKENS_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _template_tokens(tokenizer) -> _TemplateTokens:
    if tokenizer not in _TOKENS_CACHE:
        _TOKENS_CACHE[tokenizer] = _TemplateTokens(tokenizer)
    return _TOKENS_CACHE[tokenizer]


def answer_span(ids: Sequence[int], tokenizer) -> tuple[int, int]:
    """[start, end) token positions of the answer plus its closing ``<turn|>`` in one row."""
    tt = _template_tokens(tokenizer)
    ids = list(ids)
    opens = [i for i, t in enumerate(ids) if t == tt.turn_open]
    if not opens:
        raise ValueError("no chat turn found in the sequence")
    start = opens[-1] + 1
    role = ""
    # The role line ends at the first token whose text ends with a newline ("model\n").
    while start < len(ids) and not tt.text(ids[start]).endswith("\n"):
        role += tt.text(ids[start])
        start += 1
    role += tt.text(ids[start]) if start < len(ids) else ""
    if role.strip() != MODEL_ROLE:
        raise ValueError(f"last turn is {role.strip()!r}, not the model's answer")
    start += 1
    if start < len(ids) and ids[start] == tt.channel_open:
        # Large-model framing: an empty thought channel precedes the answer; it is prompt, not answer.
        try:
            start = ids.index(tt.channel_close, start) + 1
        except ValueError:
            raise ValueError("thought channel opened but never closed") from None
    try:
        end = ids.index(tt.turn_close, start) + 1
    except ValueError:
        raise ValueError("answer turn is not closed by <turn|> (sequence truncated?)") from None
    if end - start < 2:
        raise ValueError("empty answer")
    return start, end


def answer_labels(input_ids, tokenizer):
    """Labels for a batch: the answer tokens and the closing ``<turn|>``; everything else -100."""
    import torch

    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, ids in enumerate(input_ids.tolist()):
        start, end = answer_span(ids, tokenizer)
        labels[row, start:end] = input_ids[row, start:end]
    return labels


def _process(processor, texts: list[str], images: Sequence, padding_side: str):
    return processor(
        text=texts,
        images=[[img] for img in images],
        padding=True,
        padding_side=padding_side,
        return_tensors="pt",
    )


def encode_training_batch(
    processor,
    images: Sequence,
    answers: Sequence[str],
    class_names: Sequence[str],
    max_length: int | None = None,
    padding_side: str = "right",
) -> dict:
    """Model inputs with ``labels`` for a batch of (image, answer) pairs."""
    if len(images) != len(answers):
        raise ValueError(f"{len(images)} images but {len(answers)} answers")
    texts = [training_text(processor, class_names, a) for a in answers]
    batch = dict(_process(processor, texts, images, padding_side))
    check_length(batch["attention_mask"], max_length)
    batch["labels"] = answer_labels(batch["input_ids"], processor.tokenizer)
    return batch


def encode_prompt_batch(processor, images: Sequence, class_names: Sequence[str]) -> dict:
    """Model inputs for generation/scoring: prompts padded on the left so all end together."""
    texts = [prompt_text(processor, class_names)] * len(images)
    return dict(_process(processor, texts, images, padding_side="left"))


def check_length(attention_mask, max_length: int | None) -> None:
    if max_length is None:
        return
    longest = int(attention_mask.sum(dim=1).max())
    if longest > max_length:
        raise ValueError(
            f"a sample is {longest} tokens long, over --max-length {max_length}; raise --max-length "
            "(cutting it would drop the answer or split the image's soft tokens)"
        )


def prefetched(fn: Callable[[T], U], items: Iterable[T]) -> Iterator[U]:
    """``fn(item)`` for each item in order, the next one computed on a background thread while
    the caller works on the current one: image decoding and preprocessing (CPU, mostly in torch
    and PIL, which release the GIL) overlap the GPU's forward and backward. Errors surface in the
    caller, at the item that raised."""
    items = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        first = next(items, _END)
        if first is _END:
            return
        pending = pool.submit(fn, first)
        for item in items:
            ready = pending.result()
            pending = pool.submit(fn, item)
            yield ready
        yield pending.result()


_END = object()
