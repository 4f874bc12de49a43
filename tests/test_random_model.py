"""random-model: a random-init Gemma 4 of a published size on disk, loading like a downloaded one."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from components import random_model
from components.artifacts import RANDOM_MODEL_INFO

PUBLISHED_BILLIONS = {"gemma-4-e2b": 5.10, "gemma-4-e4b": 7.94, "gemma-4-31b": 31.27, "gemma-4-26b-a4b": 25.81}


@functools.cache
def processor_of(variant: str):
    return random_model.stand_in_processor(variant)


def parameters(variant: str, layers: int | None) -> int:
    from transformers import Gemma4ForConditionalGeneration

    processor = processor_of(variant)
    with torch.device("meta"):  # shapes only
        model = Gemma4ForConditionalGeneration(random_model.variant_config(variant, processor.tokenizer, layers))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", sorted(PUBLISHED_BILLIONS))
def test_fewer_layers_extrapolate_to_the_published_size(variant):
    """--layers keeps the widths: the parameters at 1-4 layer-type units are a fixed part plus a
    fixed size per unit computing its own KV and per KV-shared unit, and that line reaches the
    published size at the published depth and sharing."""
    import numpy as np

    text = random_model.load_variants()["variants"][variant]["text"]
    unit, repeat = len(text["layer_types_unit"]), text["layer_types_repeat"]
    rows, counts = [], []
    for units in range(1, 5):
        shared = random_model.text_settings(text, units * unit)["num_kv_shared_layers"] // unit
        rows.append([1, units - shared, shared])
        counts.append(parameters(variant, units * unit))
    fit, *_ = np.linalg.lstsq(np.array(rows, dtype=float), np.array(counts, dtype=float), rcond=None)
    assert np.allclose(np.array(rows) @ fit, counts, rtol=0, atol=1)  # exactly linear
    shared = text["num_kv_shared_layers"] // unit
    assert fit @ [1, repeat - shared, shared] / 1e9 == pytest.approx(PUBLISHED_BILLIONS[variant], abs=0.01)


def test_layer_pattern_and_kv_sharing_scale_by_whole_units():
    e2b = random_model.load_variants()["variants"]["gemma-4-e2b"]["text"]
    two_units = random_model.text_settings(e2b, 10)
    assert two_units["layer_types"] == e2b["layer_types_unit"] * 2 and two_units["num_hidden_layers"] == 10
    assert two_units["num_kv_shared_layers"] == 5  # E2B shares 4 of its 7 units; at least one unit computes KV
    assert random_model.text_settings(e2b, 5)["num_kv_shared_layers"] == 0
    assert random_model.text_settings(e2b, None)["num_kv_shared_layers"] == 20
    e4b = random_model.load_variants()["variants"]["gemma-4-e4b"]["text"]
    assert random_model.text_settings(e4b, 42)["num_kv_shared_layers"] == 18
    with pytest.raises(ValueError, match="--layers must be a multiple of the layer-type unit"):
        random_model.RandomModelConfig(variant="gemma-4-31b", output_dir="x", layers=7)
    with pytest.raises(ValueError, match="--variant 'gemma-4-7b'"):
        random_model.RandomModelConfig(variant="gemma-4-7b", output_dir="x")


def test_template_kind_follows_the_variant():
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which?"}]}]
    # The official generation prompts with thinking off: the large models add an empty thought
    # channel, E2B/E4B do not (tests/test_tiny_model.py has the whole shapes).
    large, small = "<|turn>model\n<|channel>thought\n<channel|>", "<turn|>\n<|turn>model\n"
    for variant, prompt in (("gemma-4-31b", large), ("gemma-4-26b-a4b", large),
                            ("gemma-4-e4b", small), ("gemma-4-e2b", small)):
        processor = random_model.stand_in_processor(variant)
        rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered.endswith(prompt), (variant, rendered)


@pytest.mark.slow
def test_written_checkpoint_loads_and_runs(tmp_path):
    """E2B widths at one unit (5 layers): bf16 shards of the config's size, loaded by the steps'
    own loader (AutoModelForMultimodalLM + AutoProcessor), one forward on a photo-sized image."""
    from safetensors import safe_open

    from bench.bench_gpu import random_photos
    from components import modeling, prompting

    folder = tmp_path / "e2b"
    assert random_model.main(["--variant", "gemma-4-e2b", "--layers", "5", "--output-dir", str(folder),
                              "--max-shard-size", "1GB"]) == 0
    expected = parameters("gemma-4-e2b", 5)
    info = json.loads((folder / RANDOM_MODEL_INFO).read_text())
    assert info["parameters"] == expected and info["layers"] == 5
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1
    stored = 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as fh:
            for key in fh.keys():
                tensor = fh.get_slice(key)
                assert tensor.get_dtype() == "BF16"
                stored += math.prod(tensor.get_shape())
    assert 2 * expected < sum(s.stat().st_size for s in shards) < 2 * expected * 1.001
    config = json.loads((folder / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 5 and config["text_config"]["hidden_size"] == 1536

    model = modeling.load_model(str(folder), torch.device("cpu"))
    # Tied embeddings are stored once; beside every parameter the files hold the persistent
    # buffers (the vision tower's clip ranges, per-layer scalars), as the real checkpoints do.
    parameter_ptrs = {p.data_ptr() for p in model.parameters()}
    buffers = sum(t.numel() for t in model.state_dict().values() if t.data_ptr() not in parameter_ptrs)
    assert buffers and stored == expected + buffers
    processor = modeling.load_processor(str(folder))
    # 70 soft tokens, one of Gemma 4's budgets (70-1120: ai.google.dev/gemma/docs/capabilities/vision):
    # the default 280 (2,520 patches) spent 10 s of bf16 CPU time in the vision tower.
    processor.image_processor.max_soft_tokens = 70
    assert type(model).__name__ == "Gemma4ForConditionalGeneration"
    batch = prompting.encode_training_batch(processor, random_photos(1, seed=0), ["pug"], ["pug", "beagle"])
    batch.pop("labels")
    assert batch["pixel_values"].shape[1] == 70 * 9  # 3 x 3 patches pooled into each soft token
    with torch.inference_mode():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], 262144) and torch.isfinite(logits).all()


def test_init_skips_only_what_transformers_overwrites():
    """random-model builds without torch's per-layer default init and then runs transformers' own
    (the model's _init_weights): every tensor must come out as the default construction makes it,
    constants and buffers exactly (clip ranges, scalars, rotary tables), random weights with the
    same spread. Skipping init_weights too would leave torch.empty memory and fail here."""
    from transformers import Gemma4ForConditionalGeneration

    from components import tiny_model

    tokenizer = tiny_model.build_tokenizer(tiny_model.TinyModelConfig(output_dir="-").vocab_size)
    config = tiny_model.build_model_config(tiny_model.TinyModelConfig(output_dir="-", hidden_size=256), tokenizer)
    torch.manual_seed(0)
    reference = Gemma4ForConditionalGeneration._from_config(config, dtype=torch.bfloat16).state_dict()
    built = random_model.init_model(config, "cpu").state_dict()
    assert built.keys() == reference.keys()
    for name, expected in reference.items():
        got, expected = built[name].float(), expected.float()
        if expected.numel() < 64 or not torch.isfinite(expected).all() or expected.std() == 0:
            assert torch.equal(got, expected), name
        else:
            assert got.std() == pytest.approx(expected.std(), rel=0.25), name
            assert abs(got.mean() - expected.mean()) < 0.25 * expected.std(), name
