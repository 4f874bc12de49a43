"""The one prompt and label recipe shared by fine-tuning and evaluation.

A sample is one user turn, the image then the instruction listing the class names; evaluation
prompts with the chat template's own generation prompt. A training sequence is that prompt, token
for token, then the answer's tokens and ``<turn|>``, so what is measured is what was trained on
every template (docs/design.md says why not the template's rendering of the answer).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")
U = TypeVar("U")

IGNORE_INDEX = -100  # label value that cross-entropy skips
TURN_CLOSE = "<turn|>"

INSTRUCTION = "What breed of pet is in this image? Answer with exactly one of these class names: {choices}."

# Per-token fields of the processor's output, with their value on appended answer tokens and on
# padding (the other fields, pixel_values and image_position_ids, are per image).
TOKEN_FIELDS = {"attention_mask": (1, 0), "mm_token_type_ids": (0, 0), "token_type_ids": (0, 0)}


def instruction(class_names: Sequence[str]) -> str:
    return INSTRUCTION.format(choices=", ".join(class_names))


def conversation(class_names: Sequence[str]) -> list[dict]:
    """Chat messages of one sample's prompt: image first, then the instruction."""
    return [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": instruction(class_names)}],
        }
    ]


def prompt_text(processor, class_names: Sequence[str]) -> str:
    """Rendered prompt ending with the template's generation prompt (thinking off by default)."""
    return processor.apply_chat_template(
        conversation(class_names), tokenize=False, add_generation_prompt=True
    )


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The supervised tokens of one answer: its own tokens, then ``<turn|>``. Templates close a
    past turn with ``<turn|>\n``, but generation stops at ``<turn|>`` (evaluate's generation
    config, the checkpoints' eos list), so the newline is never the model's to produce."""
    turn_close = tokenizer.convert_tokens_to_ids(TURN_CLOSE)
    if turn_close in (None, tokenizer.unk_token_id):
        raise ValueError(f"tokenizer has no {TURN_CLOSE} token: not a Gemma 4 chat tokenizer")
    ids = tokenizer(answer, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"answer {answer!r} has no tokens")
    return ids + [turn_close]


def encode_prompt_batch(processor, images: Sequence, class_names: Sequence[str]) -> dict:
    """Model inputs for generation/scoring: prompts padded on the left so all end together."""
    texts = [prompt_text(processor, class_names)] * len(images)
    return dict(processor(text=texts, images=[[img] for img in images], padding=True, padding_side="left",
                          return_tensors="pt"))


def encode_training_batch(
    processor,
    images: Sequence,
    answers: Sequence[str],
    class_names: Sequence[str],
    max_length: int | None = None,
) -> dict:
    """Model inputs with ``labels`` for a batch of (image, answer) pairs, padded on the right.

    Row i is the unpadded row i of ``encode_prompt_batch`` (image soft tokens expanded by the
    processor) followed by ``answer_ids(answers[i])``; labels are those answer ids, -100 elsewhere.
    """
    import torch

    if len(images) != len(answers):
        raise ValueError(f"{len(images)} images but {len(answers)} answers")
    prompts = encode_prompt_batch(processor, images, class_names)
    prompts["labels"] = torch.full_like(prompts["input_ids"], IGNORE_INDEX)
    tokenizer = processor.tokenizer
    # Per-token field -> (value on the answer's tokens, None: the answer's ids; value on padding).
    fields = {"input_ids": (None, tokenizer.pad_token_id), "labels": (None, IGNORE_INDEX)} | {
        key: values for key, values in TOKEN_FIELDS.items() if key in prompts}
    rows = []
    for row, answer in enumerate(answers):
        prompt = prompts["attention_mask"][row].bool()  # left padded: the prompt's own tokens
        ids = torch.tensor(answer_ids(tokenizer, answer))
        rows.append({key: torch.cat([prompts[key][row][prompt], ids if fill is None else torch.full_like(ids, fill)])
                     for key, (fill, _) in fields.items()})
    width = max(len(r["input_ids"]) for r in rows)
    batch = {key: value for key, value in prompts.items() if key not in fields}  # per image: as processed
    unknown = [key for key, value in batch.items() if value.shape == prompts["input_ids"].shape]
    if unknown:
        raise ValueError(f"the processor returned per-token fields {unknown} that training rows do not extend")
    for key, (_, pad) in fields.items():
        batch[key] = torch.stack([torch.nn.functional.pad(r[key], (0, width - len(r[key])), value=pad) for r in rows])
    check_length(batch["attention_mask"], max_length)
    return batch


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
    the caller works on the current one, so image preprocessing (PIL and torch release the GIL)
    overlaps the GPU. Errors surface in the caller, at the item that raised. A thread, not a
    DataLoader's worker processes: docs/design.md."""
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
