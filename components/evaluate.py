"""Evaluate step: accuracy, macro-F1, per-class scores and a confusion matrix on the eval split.

Any model folder is measured the same way: the staged base (the baseline), base + a LoRA adapter
(``--adapter-dir``), or a merged export, with the prompt fine-tuning trains on (components.prompting).

* ``generate`` (the recipe's way): a greedy answer of a few tokens, mapped to a class by name;
  an answer that names no class is ``Unknown``.
* ``score``: every class ranked by the model's log-likelihood of its answer (the tokens
  fine-tuning puts its loss on) after the prompt; never Unknown, and gives top-5 accuracy.

Writes the predictions, then the metrics (last: their presence marks a finished evaluation).

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
from typing import Any, Callable, Sequence

from components import metrics
from components.artifacts import ADAPTER_CONFIG, DATASET_MANIFEST, EVAL_METRICS, PREDICTIONS
from components.cli import UserError, entrypoint, parse_config
from components.files import sha256_file, write_bytes_atomic, write_json_atomic

MODES = ("generate", "score")
UNKNOWN_NAME = "Unknown"
TOP_K = 5
# Images per pass by the card's total memory (GiB, at least): the larger the batch, the more the
# prompt pass runs on the matmul units (docs/benchmarks.md#evaluation-batch).
BATCH_BY_GPU_GIB = ((120, 128), (75, 64), (38, 16), (0, 4))
CPU_BATCH = 8


@dataclass
class EvaluateConfig:
    """Evaluate a model folder (base, base + adapter, or merged export) on a prepared dataset's eval split."""

    model_dir: str = field(metadata={"help": "model folder (staged base or merged export: config.json, weights, processor)"})
    dataset_dir: str = field(metadata={"help": f"prepared dataset folder ({DATASET_MANIFEST} + Parquet shards)"})
    output_dir: str = field(metadata={"help": f"where {EVAL_METRICS} and {PREDICTIONS} go"})
    adapter_dir: str | None = field(default=None, metadata={
        "help": f"LoRA adapter folder ({ADAPTER_CONFIG}) to put over --model-dir"})
    mode: str = field(
        default="generate",
        metadata={"help": "generate: greedy answer mapped to a class name; score: rank classes by likelihood",
                  "choices": list(MODES)},
    )
    batch_size: int = field(
        default=0, metadata={"help": "images per forward pass; 0: from the GPU's memory ("
                                     + ", ".join(f"{b} from {g} GiB" for g, b in BATCH_BY_GPU_GIB[:-1])
                                     + f", else {BATCH_BY_GPU_GIB[-1][1]}; {CPU_BATCH} on CPU)"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N eval examples"})
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "generate mode: tokens to generate; default: the longest answer's tokens + --extra-new-tokens"},
    )
    extra_new_tokens: int = field(default=4, metadata={
        "help": "generate mode: tokens allowed past the longest class name's answer"})
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
    followed by its candidate ids: true by construction in ``prompting``, checked so score mode
    stays honest should either change. One class suffices: every row is the same concatenation."""
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


@dataclass(frozen=True)
class PackedCandidates:
    """Every candidate's fed tokens (all but its last, which is only predicted) one after another,
    no padding; per packed position: the token, the token it predicts, its candidate, and its
    step within the candidate (0: right after the prompt)."""

    inputs: Any
    targets: Any
    candidate: Any
    step: Any

    @classmethod
    def of(cls, candidates: Sequence[Sequence[int]], device) -> PackedCandidates:
        import torch

        def column(values: list[int]):
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(column([t for ids in candidates for t in ids[:-1]]),
                   column([t for ids in candidates for t in ids[1:]]),
                   column([c for c, ids in enumerate(candidates) for _ in ids[:-1]]),
                   column([j for ids in candidates for j in range(len(ids) - 1)]))


@dataclass(frozen=True)
class PaddedCandidates:
    """One row per candidate: its fed tokens padded on the right, the tokens they predict (target
    j is token j + 1), and a mask of the real positions."""

    inputs: Any
    targets: Any
    mask: Any

    @classmethod
    def of(cls, candidates: Sequence[Sequence[int]], pad_token_id: int, device) -> PaddedCandidates:
        import torch

        fed = max(len(c) for c in candidates) - 1
        inputs = torch.full((len(candidates), fed), pad_token_id, dtype=torch.long)
        targets, mask = torch.zeros_like(inputs), torch.zeros_like(inputs)
        for c, ids in enumerate(candidates):
            n = len(ids) - 1
            inputs[c, :n], targets[c, :n], mask[c, :n] = torch.tensor(ids[:-1]), torch.tensor(ids[1:]), 1
        return cls(inputs.to(device), targets.to(device), mask.to(device))


class CandidateScorer:
    """Log-likelihood of every candidate answer (its last token ``<turn|>``) after each prompt.

    ``sum``: the log-probability of the whole answer, what greedy generation maximises and
    fine-tuning drives up; the closing ``<turn|>`` keeps a name that is a prefix of a longer one
    from scoring as the longer answer. ``mean`` (per token), for comparison, is no probability.
    """

    def __init__(self, model, candidates: Sequence[Sequence[int]], pad_token_id: int, device,
                 reduction: str = "sum", chunk_size: int = 64):
        import torch

        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be sum or mean, got {reduction!r}")
        if any(len(c) < 2 for c in candidates):
            raise ValueError("every candidate answer needs at least a name token and the closing <turn|>")
        self.model, self.reduction, self.chunk_size, self.device = model, reduction, chunk_size, device
        self.first = torch.tensor([ids[0] for ids in candidates], device=device)
        self.lengths = torch.tensor([len(ids) for ids in candidates], dtype=torch.float32)
        self.packed = PackedCandidates.of(candidates, device)
        self.padded = PaddedCandidates.of(candidates, pad_token_id, device)
        self.causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.sliding_window = getattr(self.causal_lm.config.get_text_config(), "sliding_window", None)

    def __call__(self, batch: dict):
        """Scores [images, candidates] (float32, on CPU) for a prompt batch padded on the left."""
        attention_mask = batch["attention_mask"]
        out = self.model(**batch, position_ids=prompt_position_ids(attention_mask), use_cache=True,
                         logits_to_keep=1)
        # Token 0 of every candidate is predicted by the prompt's last position.
        first_logprobs = out.logits[:, -1].float().log_softmax(-1)[:, self.first]  # [images, candidates]
        cache = out.past_key_values
        del out
        # The packed pass needs every prompt token still in the sliding layers' caches (they keep
        # the last window - 1); a longer prompt goes through per-row cache copies instead.
        packable = self.causal_lm.config._attn_implementation in ("sdpa", "eager") and (
            self.sliding_window is None or attention_mask.shape[1] <= self.sliding_window - 1)
        rest = self._packed(attention_mask, cache) if packable else self._chunked(attention_mask, cache)
        scores = (first_logprobs + rest).cpu()
        if self.reduction == "mean":
            scores = scores / self.lengths
        return scores

    def _packed(self, attention_mask, cache):
        return packed_scores(self.causal_lm, self.packed, len(self.first), attention_mask, cache, self.sliding_window)

    def _chunked(self, attention_mask, cache):
        return chunked_scores(self.model, self.padded, attention_mask, cache, self.chunk_size)


def packed_masks(causal_lm, packed: PackedCandidates, attention_mask, sliding_window: int | None):
    """Attention masks of the packed pass, [images, 1, packed, prompt + packed], per layer type,
    and the packed tokens' positions, [images, packed].

    A packed token of candidate c at step j sees the prompt's real tokens (within the sliding
    window on sliding layers, by position) and tokens of c at steps <= j: exactly what it sees in
    the training sequence "prompt, answer c".
    """
    import torch

    images, prompt = attention_mask.shape
    prompt_positions = prompt_position_ids(attention_mask)  # [images, prompt]
    query_positions = attention_mask.sum(dim=1, keepdim=True) + packed.step  # [images, packed]
    own = (packed.candidate[:, None] == packed.candidate[None, :]) & (
        packed.step[None, :] <= packed.step[:, None])  # [packed, packed]
    n = own.shape[0]
    sees_prompt = attention_mask.bool()[:, None, :].expand(images, n, prompt)
    masks = {"full_attention": torch.cat([sees_prompt, own.expand(images, n, n)], dim=-1)}
    if sliding_window is not None:
        in_window = (query_positions[:, :, None] - prompt_positions[:, None, :]) < sliding_window
        masks["sliding_attention"] = torch.cat([sees_prompt & in_window, own.expand(images, n, n)], dim=-1)
    if causal_lm.config._attn_implementation == "eager":  # eager attention adds the mask to the scores
        dtype = next(causal_lm.parameters()).dtype
        masks = {k: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
                 for k, m in masks.items()}
    return {k: m[:, None] for k, m in masks.items()}, query_positions


def packed_scores(causal_lm, packed: PackedCandidates, num_candidates: int, attention_mask, cache,
                  sliding_window: int | None):
    """Sum of log-probs of each candidate's tokens after its first, [images, candidates]: all
    candidates in one pass over the prompt's KV cache (docs/benchmarks.md#score-mode)."""
    import torch

    from components import modeling

    images = attention_mask.shape[0]
    masks, positions = packed_masks(causal_lm, packed, attention_mask, sliding_window)
    hidden = causal_lm.model(
        input_ids=packed.inputs.expand(images, -1), attention_mask=masks, position_ids=positions,
        past_key_values=cache, use_cache=True,
    ).last_hidden_state
    rest = torch.zeros(images, num_candidates, dtype=torch.float32, device=packed.inputs.device)
    for row in range(images):  # one image's logits at a time: [packed, vocab] in fp32
        logprobs = modeling.output_logits(causal_lm, hidden[row]).log_softmax(-1)
        token_logprobs = logprobs.gather(-1, packed.targets[:, None]).squeeze(-1)
        rest[row].index_add_(0, packed.candidate, token_logprobs)
    return rest


def chunked_scores(model, padded: PaddedCandidates, attention_mask, cache, chunk_size: int):
    """As ``packed_scores``, for prompts longer than the sliding window: per (image, candidate)
    rows, each with its own copy of the prompt's cache, ``chunk_size`` rows per pass."""
    import torch

    device = padded.inputs.device
    images, num_candidates, fed = attention_mask.shape[0], padded.inputs.shape[0], padded.inputs.shape[1]
    prompt_lengths = attention_mask.sum(dim=1)
    rows_all = torch.arange(images, device=device).repeat_interleave(num_candidates)
    cols_all = torch.arange(num_candidates, device=device).repeat(images)
    rest = torch.empty(images * num_candidates, dtype=torch.float32, device=device)
    for start in range(0, rows_all.numel(), chunk_size):
        rows, cols = rows_all[start : start + chunk_size], cols_all[start : start + chunk_size]
        logits = model(
            input_ids=padded.inputs[cols],
            attention_mask=torch.cat([attention_mask[rows], padded.mask[cols]], dim=1),
            position_ids=prompt_lengths[rows, None] + torch.arange(fed, device=device),
            past_key_values=select_cache_rows(cache, rows),
            use_cache=True,
        ).logits.float()
        target_logits = logits.gather(-1, padded.targets[cols, :, None]).squeeze(-1)
        token_logprobs = target_logits - torch.logsumexp(logits, dim=-1)
        rest[start : start + rows.numel()] = (token_logprobs * padded.mask[cols]).sum(dim=-1)
        del logits
    return rest.view(images, num_candidates)


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
    """Images per pass for ``device``, from BATCH_BY_GPU_GIB on CUDA."""
    import torch

    if device.type != "cuda":
        return CPU_BATCH
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return next(batch for min_gib, batch in BATCH_BY_GPU_GIB if gib >= min_gib)


def check_inputs(config: EvaluateConfig) -> dict:
    """Every cheap check, before any model is loaded; returns the dataset manifest. Bad input
    raises UserError naming the flag."""
    from components import modeling
    from components.shards import read_manifest

    modeling.check_model_dir(config.model_dir)
    if config.adapter_dir is not None and not (Path(config.adapter_dir) / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"--adapter-dir {config.adapter_dir}: no {ADAPTER_CONFIG} there (not a LoRA adapter folder)")
    try:
        manifest = read_manifest(config.dataset_dir)
    except ValueError as err:  # a manifest that is not one (FileNotFoundError names the file)
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

    from components.shards import load_examples

    class_names = list(manifest["class_names"])
    examples = load_examples(config.dataset_dir, "eval", config.limit)
    if not examples:
        raise ValueError(f"--dataset-dir {config.dataset_dir}: no eval examples to evaluate")
    torch.manual_seed(config.seed)
    loaded = _load(config, class_names)
    predict = _predictor(config, loaded, class_names)
    batch_size = config.batch_size or default_batch_size(loaded.device)
    start = time.perf_counter()
    records, rankings, batch_size = _predict(config, loaded, predict, class_names, examples, batch_size)
    result = _result(config, loaded, class_names, records, rankings, time.perf_counter() - start, batch_size)
    _write(config, result, records)
    return result


@dataclass
class _Loaded:
    """The model under evaluation and what loading it resolved."""

    model: Any
    processor: Any
    candidates: list[list[int]]  # each class's answer tokens, as training labels them
    device: Any
    quantization: str
    dtype: Any  # of floating-point inputs


def _load(config: EvaluateConfig, class_names: list[str]) -> _Loaded:
    from components import modeling

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
    return _Loaded(model, processor, candidates, device, quantization, dtype)


def _max_new_tokens(config: EvaluateConfig, candidates: list[list[int]]) -> int:
    return config.max_new_tokens or max(len(c) for c in candidates) + config.extra_new_tokens


def _record(example, class_names: list[str], predicted: int, **extra) -> dict:
    """One line of the predictions file."""
    name = UNKNOWN_NAME if predicted == metrics.UNKNOWN else class_names[predicted]
    return {"id": example.id, "label": example.label_name, "label_index": example.label,
            "predicted": name, "predicted_index": predicted, **extra}


Predictor = Callable[[list, dict], list[tuple[dict, "list[int] | None"]]]


def _predictor(config: EvaluateConfig, loaded: _Loaded, class_names: list[str]) -> Predictor:
    """(examples, their prompt batch on the device) -> per example its record and, in score mode,
    its ranking of the classes (best first)."""
    tokenizer = loaded.processor.tokenizer
    if config.mode == "score":
        scorer = CandidateScorer(loaded.model, loaded.candidates, tokenizer.pad_token_id, loaded.device,
                                 config.score_reduction, config.score_chunk_size)

        def score(chunk: list, batch: dict) -> list[tuple[dict, list[int]]]:
            scores = scorer(batch)
            return [(_record(ex, class_names, ranked[0], top5=[class_names[i] for i in ranked[:TOP_K]],
                             scores=dict(zip(class_names, row))), ranked)
                    for ex, row, ranked in zip(chunk, scores.tolist(), rank_scores(scores))]

        return score
    gen_config = generation_config(tokenizer, _max_new_tokens(config, loaded.candidates))
    mapper = AnswerMapper(class_names)

    def generate(chunk: list, batch: dict) -> list[tuple[dict, None]]:
        texts = generate_answers(loaded.model, tokenizer, batch, gen_config)
        return [(_record(ex, class_names, mapper(text), raw_text=text), None) for ex, text in zip(chunk, texts)]

    return generate


def _fitted(predict: Predictor, encode, loaded: _Loaded, chunk: list, batch: dict, fits: list[int]) -> list:
    """predict() on one chunk; after a CUDA out-of-memory, the chunk again in halves, and later
    chunks in pieces of the size that fitted (``fits[0]``): the card's default batch leaves less
    room beside a bf16 model than beside an nf4 one (docs/rehearsal.md)."""
    import torch

    if len(chunk) > fits[0]:
        return [out for i in range(0, len(chunk), fits[0])
                for out in _fitted(predict, encode, loaded, *encode(chunk[i : i + fits[0]]), fits)]
    try:
        return predict(chunk, _to_device(batch, loaded.device, loaded.dtype))
    except torch.OutOfMemoryError:
        if len(chunk) == 1:
            raise
        fits[0] = len(chunk) // 2
    # Retried outside the except block, whose traceback would keep the failed pass's tensors alive.
    torch.cuda.empty_cache()
    print(f"warning: {len(chunk)} images per pass ran out of GPU memory; going on with {fits[0]}", file=sys.stderr)
    return _fitted(predict, encode, loaded, chunk, batch, fits)


def _predict(config: EvaluateConfig, loaded: _Loaded, predict: Predictor, class_names: list[str], examples: list,
             batch_size: int) -> tuple[list[dict], list[list[int]], int]:
    """Every example's record, in order, (score mode) its ranking of the classes, and the batch
    size that fitted."""
    import torch
    from tqdm import tqdm

    from components import prompting

    def encode(chunk):
        return chunk, prompting.encode_prompt_batch(loaded.processor, [ex.image() for ex in chunk], class_names)

    records, rankings, fits = [], [], [batch_size]

    def chunks():  # drawn one ahead by the prefetch: after an out-of-memory, at the size that fitted
        start = 0
        while start < len(examples):
            chunk = examples[start : start + fits[0]]
            start += len(chunk)
            yield chunk

    progress = tqdm(total=len(examples), desc=f"evaluate ({config.mode})", unit="img", file=sys.stderr)
    start = time.perf_counter()
    # bf16 autocast on CUDA: an adapter's fp32 LoRA weights then run on the bf16 tensor cores
    # like the base, as in training.
    autocast = loaded.device.type == "cuda" and config.load_dtype == "compute"
    with torch.inference_mode(), torch.autocast(loaded.device.type, dtype=torch.bfloat16, enabled=autocast):
        # The next batch is preprocessed on a CPU thread meanwhile (docs/design.md: why not DataLoader).
        for chunk, batch in prompting.prefetched(encode, chunks()):
            for record, ranked in _fitted(predict, encode, loaded, chunk, batch, fits):
                records.append(record)
                if ranked is not None:
                    rankings.append(ranked)
            progress.update(len(chunk))
            progress.set_postfix(img_per_s=f"{len(records) / (time.perf_counter() - start):.2f}")
    progress.close()
    return records, rankings, fits[0]


def _result(config: EvaluateConfig, loaded: _Loaded, class_names: list[str], records: list[dict],
            rankings: list[list[int]], seconds: float, batch_size: int) -> dict:
    y_true = [r["label_index"] for r in records]
    result = build_metrics(y_true, [r["predicted_index"] for r in records], class_names, config.mode)
    if config.mode == "score":
        result["top5_accuracy"] = metrics.top_k_accuracy(y_true, rankings, TOP_K)
        result["score_reduction"] = config.score_reduction
    else:
        result["max_new_tokens"] = _max_new_tokens(config, loaded.candidates)
    result.update({
        "images_per_s": len(records) / seconds,
        "seconds": seconds,
        "batch_size": batch_size,
        "model_dir": config.model_dir,
        "adapter_dir": config.adapter_dir,
        "dataset_dir": config.dataset_dir,
        "dataset_manifest_sha256": sha256_file(Path(config.dataset_dir) / DATASET_MANIFEST),
        "device": str(loaded.device),
        "quantization": loaded.quantization,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "config": dataclasses.asdict(config),
    })
    return result


def _write(config: EvaluateConfig, result: dict, records: list[dict]) -> None:
    output = Path(config.output_dir)
    lines = "".join(json.dumps(record) + "\n" for record in records)
    write_bytes_atomic(output / PREDICTIONS, lines.encode())
    write_json_atomic(output / EVAL_METRICS, result)  # last: marks the evaluation complete
    summary = f"accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}"
    if config.mode == "score":
        summary += f", top-5 {result['top5_accuracy']:.4f}"
    else:
        summary += f", Unknown {result['unknown_rate']:.2%}"
    print(f"evaluated {result['num_examples']} images ({config.mode}) at {result['images_per_s']:.2f} img/s: "
          f"{summary} -> {output / EVAL_METRICS}")


@entrypoint
def main(argv: list[str] | None = None) -> int:
    run(parse_config(EvaluateConfig, argv))  # run checks its inputs before loading the model
    return 0


if __name__ == "__main__":
    sys.exit(main())
