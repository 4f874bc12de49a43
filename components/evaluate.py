"""Evaluate step: accuracy, macro-F1, per-class scores and a confusion matrix on the eval split.

Any model folder can be measured the same way: the staged base (the baseline), base + a LoRA
adapter (``--adapter-dir``), or a merged export. The prompt is the one fine-tuning trains on
(components.prompting), greedy and deterministic.

Two modes:

* ``generate`` (the recipe's way): greedy generation of a few tokens per image, mapped to a class
  by name (case, underscores, hyphens and spaces ignored; the first class named, whole words
  only); an answer that names no class is ``Unknown``.
* ``score``: every class name is ranked by the model's log-likelihood of the answer (the class
  name and the closing ``<turn|>``, the very tokens fine-tuning puts its loss on) after the
  prompt. The prompt (image included) runs once per image; then all 37 candidate answers run
  in one packed pass over the prompt's KV cache, each seeing the prompt and its own earlier
  tokens only, so 37 classes cost about 1.3 prompt passes, not 37. Never Unknown; also gives
  top-5 accuracy.

Writes ``<output_dir>/predictions.jsonl`` and then ``<output_dir>/metrics.json`` (last: its
presence marks a finished evaluation), both atomically.

    gemma-pets evaluate --model-dir weights/ --adapter-dir adapter/ --dataset-dir data/ --output-dir eval/
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from components import metrics
from components.cli import UserError, entrypoint, parse_config
from components.files import sha256_file, write_bytes_atomic, write_json_atomic

MODES = ("generate", "score")
UNKNOWN_NAME = "Unknown"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
TOP_K = 5


@dataclass
class EvaluateConfig:
    """Evaluate a model folder (base, base + adapter, or merged export) on a prepared dataset's eval split."""

    model_dir: str = field(metadata={"help": "model folder (staged base or merged export: config.json, weights, processor)"})
    dataset_dir: str = field(metadata={"help": "prepared dataset folder (manifest.json + Parquet shards)"})
    output_dir: str = field(metadata={"help": "where metrics.json and predictions.jsonl go"})
    adapter_dir: str | None = field(
        default=None, metadata={"help": "LoRA adapter folder (adapter_config.json) to put over --model-dir"}
    )
    mode: str = field(
        default="generate",
        metadata={"help": "generate: greedy answer mapped to a class name; score: rank classes by likelihood",
                  "choices": list(MODES)},
    )
    batch_size: int = field(
        default=0, metadata={"help": "images per forward pass; 0: from the GPU's memory (64 on 80 GB and more, "
                                     "16 on 40 GB, 4 below; 8 on CPU)"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N eval examples"})
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "generate mode: tokens to generate; default: the longest answer's tokens + --extra-new-tokens"},
    )
    extra_new_tokens: int = field(
        default=4, metadata={"help": "generate mode: tokens allowed past the longest class name's answer"}
    )
    score_reduction: str = field(
        default="sum",
        metadata={"help": "score mode: sum (log-likelihood of the whole answer) or mean (per answer token)",
                  "choices": ["sum", "mean"]},
    )
    score_chunk_size: int = field(
        default=64,
        metadata={"help": "score mode, prompts longer than the sliding window only: (image, class) rows per "
                          "candidate pass, each with a copy of its prompt's KV cache (bounds memory)"},
    )
    quantization: str = field(
        default="auto",
        metadata={"help": "nf4 (4-bit, CUDA only), none, or auto: nf4 on CUDA, none on CPU (as fine-tuning)",
                  "choices": ["auto", "nf4", "none"]},
    )
    load_dtype: str = field(
        default="compute",
        metadata={"help": "compute: bf16 on CUDA, fp32 on CPU (as fine-tuning); saved: the dtype the folder "
                          "was saved in, no autocast (a merged export as vLLM/Transformers serve it; "
                          "needs --quantization none)",
                  "choices": ["compute", "saved"]},
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    seed: int = field(default=0, metadata={"help": "torch seed (decoding is greedy; this pins anything else)"})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.score_reduction not in ("sum", "mean"):
            raise ValueError(f"--score-reduction must be sum or mean, got {self.score_reduction!r}")
        if self.quantization not in ("auto", "nf4", "none"):
            raise ValueError(f"--quantization must be auto, nf4 or none, got {self.quantization!r}")
        if self.load_dtype not in ("compute", "saved"):
            raise ValueError(f"--load-dtype must be compute or saved, got {self.load_dtype!r}")
        if self.load_dtype == "saved" and self.quantization != "none":
            raise ValueError("--load-dtype saved evaluates the folder as saved: it needs --quantization none")
        if self.batch_size < 0:
            raise ValueError(f"--batch-size must be positive (or 0 for the GPU's default), got {self.batch_size}")
        if self.score_chunk_size <= 0:
            raise ValueError(f"--score-chunk-size must be positive, got {self.score_chunk_size}")
        for name in ("limit", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.extra_new_tokens < 0:
            raise ValueError(f"--extra-new-tokens must be >= 0, got {self.extra_new_tokens}")


# --------------------------------------------------------------------------------------------
# Answer text -> class
# --------------------------------------------------------------------------------------------


def normalize_name(text: str) -> str:
    """Lower case, with runs of underscores, hyphens and whitespace turned into one space."""
    return re.sub(r"[\s_\-]+", " ", text.lower()).strip()


class AnswerMapper:
    """Maps a generated answer to a class index, or ``metrics.UNKNOWN``.

    The class named first in the answer wins ("beagle, not a basset hound" is a beagle); of names
    found at the same place the longest wins, so "american pit bull terrier" is never read as a
    shorter name it starts with. Names match whole words only: "pug" is not found in "pugnacious".
    """

    def __init__(self, class_names: Sequence[str]):
        seen: dict[str, str] = {}
        for name in class_names:
            key = normalize_name(name)
            if not key:
                raise ValueError(f"class name {name!r} is empty once spaces and underscores are ignored")
            if key in seen:
                raise ValueError(f"class names {seen[key]!r} and {name!r} are the same once case, underscores "
                                 "and spaces are ignored; answers could not tell them apart")
            seen[key] = name
        self._patterns = [(i, re.compile(r"(?<!\w)" + re.escape(normalize_name(name)) + r"(?!\w)"))
                          for i, name in enumerate(class_names)]

    def __call__(self, answer: str) -> int:
        text = normalize_name(answer)
        found = [(match.start(), -len(match.group()), index)
                 for index, pattern in self._patterns if (match := pattern.search(text))]
        return min(found)[2] if found else metrics.UNKNOWN


# --------------------------------------------------------------------------------------------
# Candidate answers: the exact tokens fine-tuning supervises
# --------------------------------------------------------------------------------------------


def answer_token_ids(processor, class_names: Sequence[str], check_prefix: bool = True) -> list[list[int]]:
    """Per class: the token ids of its answer and closing ``<turn|>``, as training labels them.

    With ``check_prefix`` (score mode) the training sequence is checked to be exactly the
    evaluation prompt followed by these ids, the sequence that scoring "prompt, then candidate"
    ranks; generate mode only needs the answers' lengths.
    """
    from components import prompting

    answers = [prompting.answer_ids(processor.tokenizer, name) for name in class_names]
    if check_prefix:
        check_training_extends_prompt(processor, class_names, answers)
    return answers


def check_training_extends_prompt(processor, class_names: Sequence[str], answers: Sequence[Sequence[int]]) -> None:
    """Raise unless, on a probe image, the first class's training sequence is the prompt's tokens
    followed by that class's candidate ids. True by construction in ``prompting``; this keeps
    score mode honest should either recipe change. One class suffices (every row is the same
    concatenation) and keeps the cost at two processor calls, not one image per class."""
    from PIL import Image

    from components import prompting

    probe = [Image.new("RGB", (64, 64), (127, 127, 127))]
    prompt = prompting.encode_prompt_batch(processor, probe, class_names)["input_ids"][0].tolist()
    trained = prompting.encode_training_batch(processor, probe, class_names[:1], class_names)["input_ids"][0].tolist()
    if trained != prompt + list(answers[0]):
        raise ValueError(
            f"the training sequence of {class_names[0]!r} is not the evaluation prompt followed by its answer "
            "tokens; scoring prompt-then-answer would not rank what fine-tuning trained"
        )


# --------------------------------------------------------------------------------------------
# Score mode: prompt once, then all candidates from its KV cache
# --------------------------------------------------------------------------------------------


def prompt_position_ids(attention_mask):
    """Positions counted from each row's first real token, so left padding does not shift them
    (what ``generate`` does, and what the unpadded training sequence sees)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def select_cache_rows(cache, rows):
    """A new cache holding ``rows`` of ``cache`` (rows may repeat); ``cache`` itself is untouched.

    Layers are shallow-copied and their tensors re-indexed, so per-layer bookkeeping (a sliding
    layer's count of tokens seen, which sets the mask offsets once the prompt is longer than the
    window) carries over; KV-shared layers hold nothing and stay empty.
    """
    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]
    selected.batch_select_indices(rows)
    return selected


class CandidateScorer:
    """Log-likelihood of every candidate answer after each prompt of a batch.

    Score of a candidate ``t_0 .. t_{n-1}`` (its last token is ``<turn|>``) after prompt ``p``:
    ``sum_j log P(t_j | p, t_<j)``. The sum is the log-probability of the whole answer, the
    quantity greedy generation tries to maximise and fine-tuning's loss drives up, and the
    closing ``<turn|>`` in it keeps a name that is a prefix of a longer one (or stops early)
    from scoring as the longer answer. ``mean`` (per token) is offered for comparison: it removes
    the bias towards short answers but is no longer a probability of the answer.
    """

    def __init__(self, model, candidates: Sequence[Sequence[int]], pad_token_id: int, device,
                 reduction: str = "sum", chunk_size: int = 64):
        import torch

        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be sum or mean, got {reduction!r}")
        if any(len(c) < 2 for c in candidates):
            raise ValueError("every candidate answer needs at least a name token and the closing <turn|>")
        self.model, self.reduction, self.chunk_size, self.device = model, reduction, chunk_size, device
        self.num_candidates = len(candidates)
        # Fed tokens: all but the last (the last is only predicted). Target j: token j + 1.
        fed = max(len(c) for c in candidates) - 1
        self.inputs = torch.full((len(candidates), fed), pad_token_id, dtype=torch.long)
        self.targets = torch.zeros((len(candidates), fed), dtype=torch.long)
        self.mask = torch.zeros((len(candidates), fed), dtype=torch.long)
        for c, ids in enumerate(candidates):
            n = len(ids) - 1
            self.inputs[c, :n] = torch.tensor(ids[:-1])
            self.targets[c, :n] = torch.tensor(ids[1:])
            self.mask[c, :n] = 1
        self.first = torch.tensor([ids[0] for ids in candidates])
        self.lengths = torch.tensor([len(ids) for ids in candidates], dtype=torch.float32)
        # Packed: every candidate's fed tokens one after another (no padding); for each packed
        # position its candidate, its step within the candidate (0 = right after the prompt) and
        # the token it predicts.
        self.packed_inputs = torch.tensor([t for ids in candidates for t in ids[:-1]])
        self.packed_targets = torch.tensor([t for ids in candidates for t in ids[1:]])
        self.packed_candidate = torch.tensor([c for c, ids in enumerate(candidates) for _ in ids[:-1]])
        self.packed_step = torch.tensor([j for ids in candidates for j in range(len(ids) - 1)])
        (self.inputs, self.targets, self.mask, self.first, self.packed_inputs, self.packed_targets,
         self.packed_candidate, self.packed_step) = (
            t.to(device) for t in (self.inputs, self.targets, self.mask, self.first, self.packed_inputs,
                                   self.packed_targets, self.packed_candidate, self.packed_step)
        )
        self.causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        text_config = self.causal_lm.config.get_text_config()
        self.sliding_window = getattr(text_config, "sliding_window", None)
        self.attn_implementation = self.causal_lm.config._attn_implementation

    def __call__(self, batch: dict):
        """Scores [images, candidates] (float32, on CPU) for a prompt batch padded on the left."""
        import torch

        attention_mask = batch["attention_mask"]
        out = self.model(**batch, position_ids=prompt_position_ids(attention_mask), use_cache=True,
                         logits_to_keep=1)
        # Token 0 of every candidate is predicted by the prompt's last position.
        first_logprobs = out.logits[:, -1].float().log_softmax(-1)[:, self.first]  # [images, candidates]
        cache = out.past_key_values
        del out
        # The packed pass needs every prompt token still in the sliding layers' caches (they keep
        # the last window - 1); a longer prompt goes through per-row cache copies instead.
        packable = self.attn_implementation in ("sdpa", "eager") and (
            self.sliding_window is None or attention_mask.shape[1] <= self.sliding_window - 1)
        rest = self._packed(attention_mask, cache) if packable else self._chunked(attention_mask, cache)
        scores = (first_logprobs + rest).cpu()
        if self.reduction == "mean":
            scores = scores / self.lengths
        return scores

    def packed_masks(self, attention_mask):
        """Attention masks of the packed pass, [images, 1, packed, prompt + packed], per layer type.

        A packed token of candidate c at step j sees the prompt's real tokens (within the
        sliding window on sliding layers, by position) and tokens of c at steps <= j: exactly
        what it sees in the training sequence "prompt, answer c". Also returns the packed
        tokens' positions, [images, packed].
        """
        import torch

        images, prompt = attention_mask.shape
        prompt_positions = prompt_position_ids(attention_mask)  # [images, prompt]
        query_positions = attention_mask.sum(dim=1, keepdim=True) + self.packed_step  # [images, packed]
        own = (self.packed_candidate[:, None] == self.packed_candidate[None, :]) & (
            self.packed_step[None, :] <= self.packed_step[:, None])  # [packed, packed]
        packed = own.shape[0]
        sees_prompt = attention_mask.bool()[:, None, :].expand(images, packed, prompt)
        masks = {"full_attention": torch.cat([sees_prompt, own.expand(images, packed, packed)], dim=-1)}
        if self.sliding_window is not None:
            in_window = (query_positions[:, :, None] - prompt_positions[:, None, :]) < self.sliding_window
            masks["sliding_attention"] = torch.cat([sees_prompt & in_window, own.expand(images, packed, packed)], dim=-1)
        if self.attn_implementation == "eager":  # eager attention adds the mask to the scores
            dtype = next(self.causal_lm.parameters()).dtype
            masks = {k: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
                     for k, m in masks.items()}
        return {k: m[:, None] for k, m in masks.items()}, query_positions

    def _packed(self, attention_mask, cache):
        """Sum of log-probs of each candidate's tokens after its first, [images, candidates]."""
        import torch

        from components import modeling

        images = attention_mask.shape[0]
        masks, positions = self.packed_masks(attention_mask)
        hidden = self.causal_lm.model(
            input_ids=self.packed_inputs.expand(images, -1), attention_mask=masks, position_ids=positions,
            past_key_values=cache, use_cache=True,
        ).last_hidden_state
        rest = torch.zeros(images, self.num_candidates, dtype=torch.float32, device=self.device)
        for row in range(images):  # one image's logits at a time: [packed, vocab] in fp32
            logprobs = modeling.output_logits(self.causal_lm, hidden[row]).log_softmax(-1)
            token_logprobs = logprobs.gather(-1, self.packed_targets[:, None]).squeeze(-1)
            rest[row].index_add_(0, self.packed_candidate, token_logprobs)
        return rest

    def _chunked(self, attention_mask, cache):
        """As ``_packed``, for prompts longer than the sliding window: per (image, candidate)
        rows, each with its own copy of the prompt's cache, ``chunk_size`` rows per pass."""
        import torch

        images = attention_mask.shape[0]
        prompt_lengths = attention_mask.sum(dim=1)
        rows_all = torch.arange(images, device=self.device).repeat_interleave(self.num_candidates)
        cols_all = torch.arange(self.num_candidates, device=self.device).repeat(images)
        rest = torch.empty(images * self.num_candidates, dtype=torch.float32, device=self.device)
        for start in range(0, rows_all.numel(), self.chunk_size):
            rows = rows_all[start : start + self.chunk_size]
            cols = cols_all[start : start + self.chunk_size]
            fed = self.inputs.shape[1]
            logits = self.model(
                input_ids=self.inputs[cols],
                attention_mask=torch.cat([attention_mask[rows], self.mask[cols]], dim=1),
                position_ids=prompt_lengths[rows, None] + torch.arange(fed, device=self.device),
                past_key_values=select_cache_rows(cache, rows),
                use_cache=True,
            ).logits.float()
            target_logits = logits.gather(-1, self.targets[cols, :, None]).squeeze(-1)
            token_logprobs = target_logits - torch.logsumexp(logits, dim=-1)
            rest[start : start + rows.numel()] = (token_logprobs * self.mask[cols]).sum(dim=-1)
            del logits
        return rest.view(images, self.num_candidates)


def rank_scores(scores) -> list[list[int]]:
    """Class indices per row, best first; ties go to the lower class index (stable sort)."""
    import torch

    return torch.sort(scores, dim=-1, descending=True, stable=True).indices.tolist()


# --------------------------------------------------------------------------------------------
# Generate mode
# --------------------------------------------------------------------------------------------


def generation_config(tokenizer, max_new_tokens: int):
    """Greedy, whatever sampling defaults the checkpoint ships; stops at ``<turn|>`` or ``<eos>``."""
    from transformers import GenerationConfig

    from components.prompting import TURN_CLOSE

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(TURN_CLOSE)],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def generate_answers(model, tokenizer, batch: dict, gen_config) -> list[str]:
    out = model.generate(**batch, generation_config=gen_config)
    new_tokens = out[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def default_batch_size(device) -> int:
    """Images per pass for a card: a 510-token prompt's KV cache is ~0.45 GB on 31B, and larger
    batches keep the prompt pass on the matmul units (31B nf4 on an H200: batch 64 generates
    11.1 images/s at 52 GiB, batch 32 10.5 at 35 GiB; bench/bench_gpu.py)."""
    import torch

    if device.type != "cuda":
        return 8
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return 64 if gib >= 75 else 16 if gib >= 38 else 4


def check_inputs(config: EvaluateConfig) -> dict:
    """Every cheap check, before any model is loaded; returns the dataset manifest. Bad input
    raises UserError naming the flag."""
    from components import modeling
    from components.shards import read_manifest

    modeling.check_model_dir(config.model_dir)
    if config.adapter_dir is not None and not (Path(config.adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter-dir {config.adapter_dir}: no adapter_config.json there (not a LoRA adapter folder)")
    try:
        manifest = read_manifest(config.dataset_dir)
    except ValueError as err:  # a manifest.json that is not one (FileNotFoundError names the file)
        raise UserError(f"--dataset-dir {config.dataset_dir}: {err}") from None
    eval_split = manifest["splits"].get("eval")
    if not eval_split or not eval_split.get("shards"):
        raise UserError(f"--dataset-dir {config.dataset_dir}: the manifest lists no eval shards")
    if eval_split.get("num_examples") == 0:
        raise UserError(f"--dataset-dir {config.dataset_dir}: the eval split is empty")
    if not manifest["class_names"]:
        raise UserError(f"--dataset-dir {config.dataset_dir}: the manifest has no class_names")
    try:
        AnswerMapper(manifest["class_names"])  # refuses class names that answers could not tell apart
    except ValueError as err:
        raise UserError(f"--dataset-dir {config.dataset_dir}: {err}") from None
    modeling.checked_device(config.device, config.quantization)  # e.g. nf4 without CUDA fails here
    return manifest


def _to_device(batch: dict, device, dtype) -> dict:
    return {
        key: value.to(device, dtype=dtype if value.is_floating_point() else None)
        for key, value in batch.items()
    }


def build_metrics(y_true: list[int], y_pred: list[int], class_names: list[str], mode: str) -> dict:
    num_classes = len(class_names)
    with_unknown = mode == "generate"
    per_class = metrics.per_class_scores(y_true, y_pred, num_classes)
    return {
        "mode": mode,
        "num_examples": len(y_true),
        "accuracy": metrics.accuracy(y_true, y_pred),
        "macro_f1": metrics.macro_f1(y_true, y_pred, num_classes),
        "macro_f1_definition": (
            "unweighted mean of per-class F1 over the classes with at least one eval example; an Unknown "
            "answer is wrong (a false negative of its true class) and no class's false positive"
        ),
        "unknown_rate": metrics.unknown_rate(y_pred),
        "per_class": {name: per_class[i] for i, name in enumerate(class_names)},
        "class_names": list(class_names),
        "confusion_matrix": metrics.confusion_matrix(y_true, y_pred, num_classes, include_unknown=with_unknown),
        "confusion_matrix_rows": list(class_names),
        "confusion_matrix_columns": list(class_names) + ([UNKNOWN_NAME] if with_unknown else []),
    }


def run(config: EvaluateConfig) -> dict:
    manifest = check_inputs(config)

    import torch
    from tqdm import tqdm

    from components import modeling, prompting
    from components.shards import load_examples

    class_names = list(manifest["class_names"])
    examples = load_examples(config.dataset_dir, "eval", config.limit)
    if not examples:
        raise ValueError(f"--dataset-dir {config.dataset_dir}: no eval examples to evaluate")

    torch.manual_seed(config.seed)
    device = modeling.pick_device(config.device)
    quantization = modeling.resolve_quantization(config.quantization, device)
    # "auto": from_pretrained keeps the checkpoint's saved dtype (config.json's dtype)
    dtype = "auto" if config.load_dtype == "saved" else modeling.compute_dtype(device)
    processor = modeling.load_processor(config.model_dir)
    candidates = answer_token_ids(processor, class_names, check_prefix=config.mode == "score")
    if config.adapter_dir is not None:
        model = modeling.load_with_adapter(config.model_dir, config.adapter_dir, device, quantization, dtype)
    else:
        model = modeling.load_model(config.model_dir, device, quantization, dtype)
    model.eval()
    if config.load_dtype == "saved":
        dtype = model.dtype  # the saved dtype from_pretrained resolved

    tokenizer = processor.tokenizer
    mapper = AnswerMapper(class_names)
    max_new_tokens = config.max_new_tokens or max(len(c) for c in candidates) + config.extra_new_tokens
    scorer = gen_config = None
    if config.mode == "score":
        scorer = CandidateScorer(model, candidates, tokenizer.pad_token_id, device,
                                 config.score_reduction, config.score_chunk_size)
    else:
        gen_config = generation_config(tokenizer, max_new_tokens)

    y_true, y_pred, rankings, records = [], [], [], []
    start = time.perf_counter()
    progress = tqdm(total=len(examples), desc=f"evaluate ({config.mode})", unit="img", file=sys.stderr)
    def encode(chunk):
        return chunk, prompting.encode_prompt_batch(processor, [ex.image() for ex in chunk], class_names)

    batch_size = config.batch_size or default_batch_size(device)
    chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    # bf16 autocast on CUDA: an adapter's fp32 LoRA weights then run on the bf16 tensor cores
    # like the base, as in training. The next batch is preprocessed on a CPU thread meanwhile.
    autocast = device.type == "cuda" and config.load_dtype == "compute"
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for chunk, batch in prompting.prefetched(encode, chunks):
            batch = _to_device(batch, device, dtype)
            if scorer is not None:
                scores = scorer(batch)
                for ex, row, ranked in zip(chunk, scores.tolist(), rank_scores(scores)):
                    rankings.append(ranked)
                    y_pred.append(ranked[0])
                    records.append({"id": ex.id, "label": ex.label_name, "label_index": ex.label,
                                    "predicted": class_names[ranked[0]], "predicted_index": ranked[0],
                                    "top5": [class_names[i] for i in ranked[:TOP_K]],
                                    "scores": dict(zip(class_names, row))})
            else:
                for ex, text in zip(chunk, generate_answers(model, tokenizer, batch, gen_config)):
                    predicted = mapper(text)
                    y_pred.append(predicted)
                    records.append({"id": ex.id, "label": ex.label_name, "label_index": ex.label,
                                    "predicted": UNKNOWN_NAME if predicted == metrics.UNKNOWN else class_names[predicted],
                                    "predicted_index": predicted, "raw_text": text})
            y_true.extend(ex.label for ex in chunk)
            progress.update(len(chunk))
            progress.set_postfix(img_per_s=f"{len(y_true) / (time.perf_counter() - start):.2f}")
    progress.close()
    seconds = time.perf_counter() - start

    result = build_metrics(y_true, y_pred, class_names, config.mode)
    if config.mode == "score":
        result["top5_accuracy"] = metrics.top_k_accuracy(y_true, rankings, TOP_K)
        result["score_reduction"] = config.score_reduction
    else:
        result["max_new_tokens"] = max_new_tokens
    result.update({
        "images_per_s": len(y_true) / seconds,
        "seconds": seconds,
        "batch_size": batch_size,
        "model_dir": config.model_dir,
        "adapter_dir": config.adapter_dir,
        "dataset_dir": config.dataset_dir,
        "dataset_manifest_sha256": sha256_file(Path(config.dataset_dir) / "manifest.json"),
        "device": str(device),
        "quantization": quantization,
        "dtype": str(dtype).removeprefix("torch."),
        "config": dataclasses.asdict(config),
    })

    output = Path(config.output_dir)
    lines = "".join(json.dumps(record) + "\n" for record in records)
    write_bytes_atomic(output / PREDICTIONS_FILE, lines.encode())
    write_json_atomic(output / METRICS_FILE, result)  # last: marks the evaluation complete
    summary = f"accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}"
    if config.mode == "score":
        summary += f", top-5 {result['top5_accuracy']:.4f}"
    else:
        summary += f", Unknown {result['unknown_rate']:.2%}"
    print(f"evaluated {len(y_true)} images ({config.mode}) at {result['images_per_s']:.2f} img/s: {summary} "
          f"-> {output / METRICS_FILE}")
    return result


@entrypoint
def main(argv: list[str] | None = None) -> int:
    run(parse_config(EvaluateConfig, argv))  # run checks its inputs before loading the model
    return 0


if __name__ == "__main__":
    sys.exit(main())
