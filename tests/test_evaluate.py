"""Evaluate step on the tiny Gemma 4 stand-in: answer mapping, cached candidate scoring against
independent full forwards, both modes end to end, determinism, adapters, and input errors."""

from __future__ import annotations

import io
import json
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from components import evaluate, metrics, modeling, prompting
from components.artifacts import DATASET_MANIFEST, EVAL_METRICS, PREDICTIONS
from components.evaluate import AnswerMapper, EvaluateConfig
from components.files import sha256_bytes, write_json_atomic

# The last name is not in the tiny tokenizer's training text: it splits into ~10 byte/BPE
# pieces, so candidates of very different lengths are padded together.
CLASSES = ["Abyssinian", "american_bulldog", "american_pit_bull_terrier", "great_pyrenees", "Shiba Inu zq"]
# (width, height): different aspect ratios give different numbers of image soft tokens, so
# every prompt batch needs left padding.
SIZES = [(128, 128), (320, 64), (48, 200), (96, 160), (200, 90), (64, 64)]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These tiny models are too small to gain from intra-op threads, and on a shared 2-core
    machine the threads' spin-waits made each forward about 3x slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_image(index: int) -> Image.Image:
    width, height = SIZES[index % len(SIZES)]
    img = Image.new("RGB", (width, height), ((53 * index) % 256, (97 * index) % 256, (151 * index) % 256))
    ImageDraw.Draw(img).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(250, 250, 250))
    return img


def write_dataset(path, num_examples: int = 6, class_names=CLASSES) -> str:
    """A prepared dataset in the shard reader's format (what prepare-dataset writes)."""
    path.mkdir(parents=True, exist_ok=True)
    labels = [i % len(class_names) for i in range(num_examples)]
    images = []
    for i in range(num_examples):
        buf = io.BytesIO()
        make_image(i).save(buf, format="PNG")
        images.append(buf.getvalue())
    table = pa.table({
        "id": [f"img-{i:03d}" for i in range(num_examples)],
        "image": pa.array(images, pa.binary()),
        "label": pa.array(labels, pa.int64()),
        "label_name": [class_names[label] for label in labels],
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    (path / "eval-00000-of-00001.parquet").write_bytes(data)
    shard = {"file": "eval-00000-of-00001.parquet", "sha256": sha256_bytes(data), "num_examples": num_examples}
    write_json_atomic(path / DATASET_MANIFEST, {
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "splits": {"eval": {"num_examples": num_examples, "shards": [shard]},
                   "train": {"num_examples": 0, "shards": []}},
    })
    return str(path)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "prepared")


# The tiny model's sliding window (128 tokens) is longer than these 5-class prompts (about 110
# tokens); the score tests shrink it to 64 so sliding layers' caches really drop old entries.
SMALL_WINDOW = 64


def model_variant(source, path, **text_config):
    """A copy of a tiny model folder with some text-config fields changed."""
    shutil.copytree(source, path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"].update(text_config)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def score_models(tiny_model_dir, tiny_large_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("score-models")
    return {
        # E2B-like: KV-shared layers, causal attention everywhere.
        "e2b_like": model_variant(tiny_model_dir, root / "e2b", sliding_window=SMALL_WINDOW),
        # 31B / 26B-A4B attention: no KV sharing, bidirectional attention among image tokens,
        # keys reused as values on full-attention layers.
        "large_like": model_variant(tiny_model_dir, root / "large", sliding_window=SMALL_WINDOW,
                                    num_kv_shared_layers=0, use_bidirectional_attention="vision",
                                    attention_k_eq_v=True, num_global_key_value_heads=1),
        # The large models' chat framing: the prompt ends with an empty thought channel.
        "large_template": model_variant(tiny_large_model_dir, root / "template", sliding_window=SMALL_WINDOW),
    }


@pytest.fixture(scope="module")
def varied_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its (tied) token embeddings redrawn at std 0.02 (seeded): its greedy
    answers then differ from image to image, so comparing generated texts (padding, adapters)
    can tell runs apart. The stand-in's own wider embeddings make one token win everywhere."""
    from transformers import AutoModelForMultimodalLM

    path = tmp_path_factory.mktemp("models") / "tiny-varied"
    shutil.copytree(tiny_model_dir, path)
    model = AutoModelForMultimodalLM.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------
# Answer -> class
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, expected", [
    ("great_pyrenees", "great_pyrenees"),
    ("Great Pyrenees", "great_pyrenees"),
    ("GREAT-PYRENEES.", "great_pyrenees"),
    ("  great   pyrenees\n", "great_pyrenees"),
    ("american_pit_bull_terrier", "american_pit_bull_terrier"),
    ("American Pit Bull Terrier", "american_pit_bull_terrier"),
    ("It is an american bulldog.", "american_bulldog"),
    ("abyssinian", "Abyssinian"),
    ("shiba_inu_zq", "Shiba Inu zq"),
    ("Abyssinians", "Unknown"),  # whole words only
    ("bulldog", "Unknown"),
    ("american", "Unknown"),
    ("", "Unknown"),
])
def test_answer_maps_to_class(answer, expected):
    index = AnswerMapper(CLASSES)(answer)
    assert (CLASSES[index] if index != metrics.UNKNOWN else "Unknown") == expected


def test_longest_overlapping_class_name_wins():
    # Both shorter names occur inside the longer one; listed first, they must still lose.
    names = ["pit bull", "terrier", "american pit bull terrier", "american_bulldog"]
    mapper = AnswerMapper(names)
    assert mapper("American_Pit_Bull_Terrier") == 2
    assert mapper("a pit bull") == 0
    assert mapper("terrier") == 1


def test_first_class_named_wins_on_the_real_names():
    from components.prepare_dataset import OXFORD_PET_CLASSES

    mapper = AnswerMapper(OXFORD_PET_CLASSES)
    for answer, expected in [
        ("beagle, not a basset hound", "beagle"),
        ("a basset hound, not a beagle", "basset_hound"),
        ("American pit bull terrier, maybe a Staffordshire bull terrier", "american_pit_bull_terrier"),
        ("Staffordshire bull terrier or American pit bull terrier?", "staffordshire_bull_terrier"),
        ("american bulldog; an american pit bull terrier", "american_bulldog"),
    ]:
        assert OXFORD_PET_CLASSES[mapper(answer)] == expected, answer


def test_names_found_at_the_same_place_go_to_the_longest():
    mapper = AnswerMapper(["pit bull", "pit bull terrier", "terrier"])
    assert mapper("pit bull terrier, or a terrier") == 1
    assert mapper("a pit bull, not a pit bull terrier") == 0


def test_class_names_that_answers_cannot_tell_apart_are_refused():
    with pytest.raises(ValueError, match="same once case"):
        AnswerMapper(["great_pyrenees", "Great Pyrenees"])


# --------------------------------------------------------------------------------------------
# Score mode: cached candidates == independent full sequences
# --------------------------------------------------------------------------------------------


def on_device(batch: dict, device) -> dict:
    dtype = modeling.compute_dtype(device)
    return {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}


def independent_scores(model, processor, images, class_names, device=torch.device("cpu")):
    """Reference: each (image, class) as its own unpadded training sequence, full forward, sum of
    log-probs of exactly the tokens fine-tuning labels (answer + <turn|>)."""
    scores = torch.empty(len(images), len(class_names))
    for i, image in enumerate(images):
        for c, name in enumerate(class_names):
            batch = on_device(prompting.encode_training_batch(processor, [image], [name], class_names), device)
            labels = batch.pop("labels")
            logprobs = model(**batch).logits[:, :-1].float().log_softmax(-1)
            targets = labels[:, 1:]
            keep = targets != prompting.IGNORE_INDEX
            scores[i, c] = logprobs[keep].gather(-1, targets[keep][:, None]).sum()
    return scores


@pytest.mark.parametrize("window", ["shorter than the prompt", "ends inside the answers", "wider"])
@pytest.mark.parametrize("variant", ["e2b_like", "large_like", "large_template"])
def test_shared_prefix_scores_equal_independent_scoring(variant, window, score_models, tmp_path, monkeypatch):
    device = torch.device("cpu")
    processor = modeling.load_processor(str(score_models[variant]))
    images = [make_image(i) for i in range(3)]
    batch = prompting.encode_prompt_batch(processor, images, CLASSES)
    prompt = batch["input_ids"].shape[1]
    # Shorter: the sliding layers' caches have dropped the oldest prompt tokens, so candidates
    # go through per-row cache copies. Otherwise one packed pass: with a window of prompt + 2,
    # a candidate's third token no longer sees the first prompt token on sliding layers.
    sliding_window = {"shorter than the prompt": SMALL_WINDOW, "ends inside the answers": prompt + 2,
                      "wider": 4 * prompt}[window]
    model_dir = model_variant(score_models[variant], tmp_path / "model", sliding_window=sliding_window)
    model = modeling.load_model(str(model_dir), device).eval()
    # The situations the cache path must get right are really there: left padding, and prompts
    # longer than the sliding window or candidates that cross its edge.
    assert (batch["attention_mask"] == 0).any()
    if window == "shorter than the prompt":
        assert batch["attention_mask"].sum(1).min() > sliding_window
    candidates = evaluate.answer_token_ids(processor, CLASSES)
    assert max(map(len, candidates)) >= 5 and min(map(len, candidates)) == 2
    # 4 rows per candidate pass: chunks cut across images and across one image's candidates.
    scorer = evaluate.CandidateScorer(model, candidates, processor.tokenizer.pad_token_id, device, chunk_size=4)

    def wrong_path(*args):
        raise AssertionError("this window should take the other scoring path")

    monkeypatch.setattr(scorer, "_packed" if window == "shorter than the prompt" else "_chunked", wrong_path)
    with torch.inference_mode():
        cached = scorer(batch)
        reference = independent_scores(model, processor, images, CLASSES)
    torch.testing.assert_close(cached, reference, atol=1e-4, rtol=1e-5)
    # Scores must tell images and classes apart, or the comparison above proves little.
    assert reference.std() > 1.0 and (reference[0] - reference[1]).abs().max() > 1e-3


def test_bidirectional_image_attention_is_in_effect(score_models):
    """The large-like variant's scores change when its image tokens attend only causally, so the
    equality test above covers the bidirectional mask and not only a causal one."""
    device = torch.device("cpu")
    processor = modeling.load_processor(str(score_models["large_like"]))
    model = modeling.load_model(str(score_models["large_like"]), device).eval()
    candidates = evaluate.answer_token_ids(processor, CLASSES)
    scorer = evaluate.CandidateScorer(model, candidates, processor.tokenizer.pad_token_id, device)
    batch = prompting.encode_prompt_batch(processor, [make_image(0)], CLASSES)
    with torch.inference_mode():
        bidirectional = scorer(dict(batch))
        model.config.text_config.use_bidirectional_attention = None
        causal = scorer(dict(batch))
    assert (bidirectional - causal).abs().max() > 1e-4


def test_mean_reduction_divides_by_answer_length(tiny_model_dir):
    device = torch.device("cpu")
    processor = modeling.load_processor(str(tiny_model_dir))
    model = modeling.load_model(str(tiny_model_dir), device).eval()
    candidates = evaluate.answer_token_ids(processor, CLASSES)
    batch = prompting.encode_prompt_batch(processor, [make_image(1)], CLASSES)
    pad = processor.tokenizer.pad_token_id
    with torch.inference_mode():
        summed = evaluate.CandidateScorer(model, candidates, pad, device, "sum")(batch)
        mean = evaluate.CandidateScorer(model, candidates, pad, device, "mean")(batch)
    torch.testing.assert_close(mean, summed / torch.tensor([len(c) for c in candidates], dtype=torch.float32))


# --------------------------------------------------------------------------------------------
# The step end to end
# --------------------------------------------------------------------------------------------


def read_predictions(output_dir):
    return [json.loads(line) for line in (output_dir / PREDICTIONS).read_text().splitlines()]


def check_consistent(result, predictions, mode):
    """metrics.json agrees with predictions.jsonl and with itself."""
    n = result["num_examples"]
    assert len(predictions) == n == 6
    matrix = result["confusion_matrix"]
    assert len(matrix) == len(CLASSES) and sum(map(sum, matrix)) == n
    assert result["confusion_matrix_columns"] == CLASSES + (["Unknown"] if mode == "generate" else [])
    assert all(len(row) == len(result["confusion_matrix_columns"]) for row in matrix)
    for c, name in enumerate(CLASSES):
        assert sum(matrix[c]) == result["per_class"][name]["support"]
    y_true = [p["label_index"] for p in predictions]
    y_pred = [p["predicted_index"] for p in predictions]
    assert [CLASSES[i] for i in y_true] == [p["label"] for p in predictions]
    assert result["accuracy"] == pytest.approx(metrics.accuracy(y_true, y_pred))
    assert result["macro_f1"] == pytest.approx(metrics.macro_f1(y_true, y_pred, len(CLASSES)))
    assert result["unknown_rate"] == pytest.approx(metrics.unknown_rate(y_pred))
    assert sum(matrix[c][c] for c in range(len(CLASSES))) == sum(t == p for t, p in zip(y_true, y_pred))
    assert result["images_per_s"] > 0 and result["mode"] == mode


def test_generate_mode_end_to_end_and_deterministic(varied_model_dir, dataset_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    # One run through the CLI, one through run(): same flags, same answers.
    assert evaluate.main(["--model-dir", str(varied_model_dir), "--dataset-dir", dataset_dir,
                          "--output-dir", str(first), "--batch-size", "4"]) == 0
    result = evaluate.run(EvaluateConfig(model_dir=str(varied_model_dir), dataset_dir=dataset_dir,
                                         output_dir=str(second), batch_size=4))
    on_disk = json.loads((first / EVAL_METRICS).read_text())
    predictions = read_predictions(first)
    check_consistent(on_disk, predictions, "generate")
    assert len({p["raw_text"] for p in predictions}) > 1, "answers should differ between images"
    assert read_predictions(second) == predictions
    # Left padding changes nothing: one image per batch generates the same answers.
    unpadded = tmp_path / "unpadded"
    evaluate.run(EvaluateConfig(model_dir=str(varied_model_dir), dataset_dir=dataset_dir,
                                output_dir=str(unpadded), batch_size=1))
    assert [p["raw_text"] for p in read_predictions(unpadded)] == [p["raw_text"] for p in predictions]
    assert {k: v for k, v in result.items() if k not in ("images_per_s", "seconds", "config")} == {
        k: v for k, v in on_disk.items() if k not in ("images_per_s", "seconds", "config")}
    mapper = AnswerMapper(CLASSES)
    for p in predictions:
        assert p["predicted_index"] == mapper(p["raw_text"])
        assert p["predicted"] == ("Unknown" if p["predicted_index"] == -1 else CLASSES[p["predicted_index"]])
    # Longest answer: the 10-token "Shiba Inu zq<turn|>", plus 4 extra tokens.
    assert on_disk["max_new_tokens"] == 14
    assert on_disk["adapter_dir"] is None and "top5_accuracy" not in on_disk


def test_generate_mode_maps_answers_into_the_metrics(tiny_model_dir, dataset_dir, tmp_path, monkeypatch):
    """The random tiny model never names a class; here the answers are fixed to check the path
    from answer text to metrics against hand-computed values."""
    answers = ["Great Pyrenees.", "american pit bull terrier", "no idea"]
    given = []

    def fixed_answers(model, tokenizer, batch, gen_config):
        texts = [answers[(len(given) + i) % 3] for i in range(batch["input_ids"].shape[0])]
        given.extend(texts)
        return texts

    monkeypatch.setattr(evaluate, "generate_answers", fixed_answers)
    result = evaluate.run(EvaluateConfig(model_dir=str(tiny_model_dir), dataset_dir=dataset_dir,
                                         output_dir=str(tmp_path), batch_size=4))
    # true labels i % 5: [0, 1, 2, 3, 4, 0]; answers cycle -> predicted [3, 2, U, 3, 2, U].
    # Right only at i = 3 -> accuracy 1/6; Unknown 2/6.
    # class 3 (great_pyrenees): predicted at 0 and 3, right once -> P 1/2, R 1/1, F1 2/3;
    # class 2: predicted at 1 and 4, never right -> 0; classes 0, 1, 4 never predicted -> 0.
    # macro-F1 over the 5 true classes = (2/3) / 5 = 2/15.
    assert result["accuracy"] == pytest.approx(1 / 6)
    assert result["unknown_rate"] == pytest.approx(2 / 6)
    assert result["macro_f1"] == pytest.approx(2 / 15)
    assert result["per_class"]["great_pyrenees"] == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert result["confusion_matrix"] == [
        # Aby bull pit pyr shiba Unknown
        [0, 0, 0, 1, 0, 1],  # Abyssinian (i = 0, 5)
        [0, 0, 1, 0, 0, 0],  # american_bulldog (i = 1)
        [0, 0, 0, 0, 0, 1],  # american_pit_bull_terrier (i = 2)
        [0, 0, 0, 1, 0, 0],  # great_pyrenees (i = 3)
        [0, 0, 1, 0, 0, 0],  # Shiba Inu zq (i = 4)
    ]
    predictions = read_predictions(tmp_path)
    assert [p["raw_text"] for p in predictions] == given
    assert [p["predicted"] for p in predictions] == [
        "great_pyrenees", "american_pit_bull_terrier", "Unknown", "great_pyrenees", "american_pit_bull_terrier",
        "Unknown"]


def test_score_mode_end_to_end(tiny_model_dir, dataset_dir, tmp_path):
    result = evaluate.run(EvaluateConfig(model_dir=str(tiny_model_dir), dataset_dir=dataset_dir,
                                         output_dir=str(tmp_path), mode="score", batch_size=4,
                                         score_chunk_size=7))
    predictions = read_predictions(tmp_path)
    check_consistent(result, predictions, "score")
    assert result["unknown_rate"] == 0.0
    y_true = [p["label_index"] for p in predictions]
    ranked = [sorted(range(len(CLASSES)), key=lambda c: -p["scores"][CLASSES[c]]) for p in predictions]
    assert result["top5_accuracy"] == pytest.approx(metrics.top_k_accuracy(y_true, ranked, 5))
    assert result["top5_accuracy"] >= result["accuracy"]
    for p, order in zip(predictions, ranked):
        assert set(p["scores"]) == set(CLASSES)
        assert p["predicted"] == CLASSES[order[0]] and p["top5"] == [CLASSES[c] for c in order[:5]]
    # Batch size and chunking change nothing: one image at a time gives the same scores.
    again = tmp_path / "one-by-one"
    evaluate.run(EvaluateConfig(model_dir=str(tiny_model_dir), dataset_dir=dataset_dir, output_dir=str(again),
                                mode="score", batch_size=1, score_chunk_size=64))
    for p, q in zip(predictions, read_predictions(again)):
        assert q["scores"] == pytest.approx(p["scores"], abs=1e-4)


def test_both_modes_prompt_with_the_trained_prefix(tiny_model_dir, tiny_large_model_dir, dataset_dir, tmp_path,
                                                  monkeypatch):
    """On every template shape (E2B/E4B; 31B/26B-A4B, whose past model turns lack the generation
    prompt's empty thought channel; the reverse divergence): what generate mode generates from
    and what score mode scores after is, token for token, what each image's training sequence
    holds before its answer, and score mode's candidates are the tokens training supervises."""
    from tests.helpers import HISTORY_WITH_CHANNEL_TEMPLATE, model_with_chat_template

    seen = {"generate": [], "score": [], "candidates": None}
    real_generate = evaluate.generate_answers

    def spy_generate(model, tokenizer, batch, gen_config):
        seen["generate"].append(batch)
        return real_generate(model, tokenizer, batch, gen_config)

    class SpyScorer(evaluate.CandidateScorer):
        def __init__(self, model, candidates, *args, **kwargs):
            seen["candidates"] = candidates
            super().__init__(model, candidates, *args, **kwargs)

        def __call__(self, batch):
            seen["score"].append(batch)
            return super().__call__(batch)

    monkeypatch.setattr(evaluate, "generate_answers", spy_generate)
    monkeypatch.setattr(evaluate, "CandidateScorer", SpyScorer)
    diverging = model_with_chat_template(tiny_model_dir, tmp_path / "diverging", HISTORY_WITH_CHANNEL_TEMPLATE)
    examples = 6
    images, labels = [make_image(i) for i in range(examples)], [CLASSES[i % len(CLASSES)] for i in range(examples)]
    for framing, model_dir in (("small", tiny_model_dir), ("large", tiny_large_model_dir), ("diverging", diverging)):
        processor = modeling.load_processor(str(model_dir))
        training = prompting.encode_training_batch(processor, images, labels, CLASSES)
        answer_starts = [int((label != prompting.IGNORE_INDEX).nonzero().min()) for label in training["labels"]]
        trained_prefixes = [ids[:start] for ids, start in zip(training["input_ids"], answer_starts)]
        for mode in ("generate", "score"):
            seen[mode].clear()
            evaluate.run(EvaluateConfig(model_dir=str(model_dir), dataset_dir=dataset_dir, mode=mode, batch_size=4,
                                        output_dir=str(tmp_path / framing / mode), max_new_tokens=2))
            prompts = [ids[mask.bool()] for batch in seen[mode] for ids, mask in zip(batch["input_ids"],
                                                                                    batch["attention_mask"])]
            assert len(prompts) == examples
            for prompt, trained in zip(prompts, trained_prefixes):
                assert prompt.tolist() == trained.tolist(), (framing, mode)
        for c, name in enumerate(CLASSES):
            row = labels.index(name)
            supervised = training["labels"][row][training["labels"][row] != prompting.IGNORE_INDEX]
            assert seen["candidates"][c] == supervised.tolist(), (framing, name)


def test_score_mode_guard_names_a_candidate_training_would_not_supervise(tiny_large_model_dir):
    processor = modeling.load_processor(str(tiny_large_model_dir))
    answers = evaluate.answer_token_ids(processor, CLASSES)  # checked: passes on the large template
    with pytest.raises(ValueError, match="training sequence of 'Abyssinian' is not the evaluation prompt"):
        evaluate.check_training_extends_prompt(processor, CLASSES, answers[1:] + answers[:1])


def make_adapter(model_dir, adapter_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = modeling.load_model(str(model_dir), torch.device("cpu"))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=modeling.lora_target_modules(model)))
    # A fresh adapter is the identity (lora_B = 0); perturb it so it changes the model.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(adapter_dir)


def test_adapter_path_changes_predictions(varied_model_dir, dataset_dir, tmp_path):
    adapter_dir = tmp_path / "adapter"
    make_adapter(varied_model_dir, adapter_dir)
    runs = {}
    for name, adapter in [("base", None), ("adapter", str(adapter_dir))]:
        for mode in ("score", "generate"):
            out = tmp_path / f"{name}-{mode}"
            result = evaluate.run(EvaluateConfig(model_dir=str(varied_model_dir), dataset_dir=dataset_dir,
                                                 output_dir=str(out), adapter_dir=adapter, mode=mode, limit=3))
            assert result["adapter_dir"] == adapter and result["num_examples"] == 3
            runs[name, mode] = read_predictions(out)
    base_scores = torch.tensor([[p["scores"][c] for c in CLASSES] for p in runs["base", "score"]])
    adapted_scores = torch.tensor([[p["scores"][c] for c in CLASSES] for p in runs["adapter", "score"]])
    assert (base_scores - adapted_scores).abs().max() > 0.1
    assert [p["raw_text"] for p in runs["base", "generate"]] != [p["raw_text"] for p in runs["adapter", "generate"]]


# --------------------------------------------------------------------------------------------
# Bad input: clear errors before any model is loaded
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model or processor was loaded before the inputs were checked")

    for name in ("load_model", "load_with_adapter", "load_processor"):
        monkeypatch.setattr(modeling, name, refuse)


def test_errors_name_the_bad_input(tiny_model_dir, dataset_dir, tmp_path, no_model_loading):
    ok = dict(model_dir=str(tiny_model_dir), dataset_dir=dataset_dir, output_dir=str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        evaluate.run(EvaluateConfig(**{**ok, "dataset_dir": str(tmp_path)}))
    with pytest.raises(FileNotFoundError, match="--model-dir .*no config.json"):
        evaluate.run(EvaluateConfig(**{**ok, "model_dir": str(tmp_path / "missing")}))
    with pytest.raises(FileNotFoundError, match="--adapter-dir .*no adapter_config.json"):
        evaluate.run(EvaluateConfig(**ok, adapter_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="nf4 needs a CUDA GPU"):
        evaluate.run(EvaluateConfig(**ok, quantization="nf4", device="cpu"))
    empty = write_dataset(tmp_path / "empty", num_examples=0)
    with pytest.raises(ValueError, match="eval split is empty"):
        evaluate.run(EvaluateConfig(**{**ok, "dataset_dir": empty}))
    clash = write_dataset(tmp_path / "clash", num_examples=2, class_names=["great_pyrenees", "Great Pyrenees"])
    with pytest.raises(ValueError, match="same once case"):
        evaluate.run(EvaluateConfig(**{**ok, "dataset_dir": clash}))
    with pytest.raises(ValueError, match="--mode must be one of generate, score"):
        EvaluateConfig(**ok, mode="classify")
    with pytest.raises(ValueError, match="--batch-size must be positive"):
        EvaluateConfig(**ok, batch_size=-1)
    with pytest.raises(ValueError, match="--limit must be positive"):
        EvaluateConfig(**ok, limit=0)
    assert not (tmp_path / "out").exists()


def test_cli_errors_are_one_line(tiny_model_dir, dataset_dir, tmp_path, no_model_loading, capsys):
    base = ["--model-dir", str(tiny_model_dir), "--dataset-dir", dataset_dir, "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as err:
        evaluate.main(base + ["--mode", "classify"])
    assert err.value.code == 2 and "invalid choice: 'classify'" in capsys.readouterr().err
    assert evaluate.main(base + ["--adapter-dir", str(tmp_path)]) == 2
    assert re.match("error: --adapter-dir .*no adapter_config.json", capsys.readouterr().err)
    assert evaluate.main(["--model-dir", str(tiny_model_dir), "--dataset-dir", str(tmp_path), "--output-dir", str(tmp_path)]) == 2
    assert re.match("error: .*manifest.json not found", capsys.readouterr().err)


# --------------------------------------------------------------------------------------------
# CUDA (device machine: `make test-gpu`)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_nf4_cached_scores_and_both_modes(tiny_model_dir, dataset_dir, tmp_path):
    device = torch.device("cuda")
    processor = modeling.load_processor(str(tiny_model_dir))
    model = modeling.load_model(str(tiny_model_dir), device, "nf4").eval()
    images = [make_image(i) for i in range(3)]
    candidates = evaluate.answer_token_ids(processor, CLASSES)
    scorer = evaluate.CandidateScorer(model, candidates, processor.tokenizer.pad_token_id, device, chunk_size=4)
    with torch.inference_mode():
        cached = scorer(on_device(prompting.encode_prompt_batch(processor, images, CLASSES), device))
        reference = independent_scores(model, processor, images, CLASSES, device)
    diff = (cached - reference).abs().max().item()
    print(f"nf4/bf16 cached vs independent: max |score diff| {diff:.4f} (scores ~{reference.abs().mean():.1f})")
    # bf16 activations keep ~3 significant digits; padded, cached and unpadded full forwards
    # round differently, and the tiny model's logits reach the +-30 softcap, so sums of log-probs
    # agree to tenths (0.20 measured on an H200); a broken cache or shifted positions are off by
    # several units (CPU fp32, where rounding is out of the picture: 1e-5).
    assert diff < 0.5
    for mode in ("score", "generate"):
        result = evaluate.run(EvaluateConfig(model_dir=str(tiny_model_dir), dataset_dir=dataset_dir,
                                             output_dir=str(tmp_path / mode), mode=mode, batch_size=4))
        assert result["quantization"] == "nf4" and result["device"].startswith("cuda")
        check_consistent(result, read_predictions(tmp_path / mode), mode)
        print(f"cuda nf4 {mode}: {result['images_per_s']:.1f} img/s")


def test_default_batch_size_comes_from_the_gpus_memory(monkeypatch):
    from types import SimpleNamespace

    for gib, expected in ((141, 128), (94, 64), (80, 64), (48, 16), (24, 4)):
        total = int((gib - 1.5) * 2**30)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, t=total: SimpleNamespace(total_memory=t))
        assert evaluate.default_batch_size(torch.device("cuda", 0)) == expected, gib
    assert evaluate.default_batch_size(torch.device("cpu")) == 8


def test_out_of_memory_halves_the_batch_and_loses_no_image(tiny_model_dir, dataset_dir, tmp_path, monkeypatch):
    """A pass that runs out of GPU memory is redone in halves, later batches at the size that fitted:
    the card's default batch (64 on 80 GB) leaves less room beside a bf16 31B than beside nf4."""
    real_predictor, sizes = evaluate._predictor, []

    def predictor(config, loaded, class_names):
        predict = real_predictor(config, loaded, class_names)

        def at_most_two(chunk, batch):
            sizes.append(len(chunk))
            if len(chunk) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return predict(chunk, batch)

        return at_most_two

    common = dict(model_dir=str(tiny_model_dir), dataset_dir=dataset_dir, mode="score")
    monkeypatch.setattr(evaluate, "_predictor", predictor)
    halved = evaluate.run(EvaluateConfig(output_dir=str(tmp_path / "halved"), batch_size=4, **common))
    assert sizes == [4, 2, 2, 2] and halved["batch_size"] == 2  # 6 images: 4 -> 2 + 2, then the last 2
    monkeypatch.setattr(evaluate, "_predictor", real_predictor)
    plain = evaluate.run(EvaluateConfig(output_dir=str(tmp_path / "plain"), batch_size=2, **common))
    assert read_predictions(tmp_path / "halved") == read_predictions(tmp_path / "plain")
    assert halved["accuracy"] == plain["accuracy"] and halved["num_examples"] == 6


def test_saved_dtype_evaluates_an_export_as_saved(tiny_model_dir, dataset_dir, tmp_path):
    """--load-dtype saved loads a bf16 export in bf16 (as vLLM/Transformers serve it), not in the
    compute dtype (fp32 on CPU); it refuses a quantised load."""
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    export = tmp_path / "bf16-export"
    AutoModelForMultimodalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(export)
    AutoProcessor.from_pretrained(tiny_model_dir).save_pretrained(export)
    common = dict(model_dir=str(export), dataset_dir=dataset_dir, batch_size=4, limit=4, quantization="none")
    saved = evaluate.run(EvaluateConfig(output_dir=str(tmp_path / "saved"), load_dtype="saved", **common))
    computed = evaluate.run(EvaluateConfig(output_dir=str(tmp_path / "computed"), **common))
    assert (saved["dtype"], computed["dtype"]) == ("bfloat16", "float32")
    with pytest.raises(ValueError, match="needs --quantization none"):
        EvaluateConfig(output_dir=str(tmp_path / "x"), load_dtype="saved",
                       **{**common, "quantization": "auto"})
