"""Learning proof on CPU: the tiny model goes from chance to >= 90% on held-out synthetic pets.

Baseline and tuned are evaluated on the same held-out images in both eval modes, under both chat
template shapes: E2B/E4B's, and 31B/26B-A4B's, whose generation prompt (an empty thought
channel) differs from how past model turns render, so training must extend the served prompt.
About a minute per template on the 2-core machine (fine-tune, four evaluations of 80 images).
"""

from __future__ import annotations

import pytest

from components import evaluate, finetune, prepare_dataset, shards, synthetic_pets, tiny_model

NUM_CLASSES = 8


@pytest.mark.slow
@pytest.mark.parametrize("template", ["tiny_model_dir", "tiny_large_model_dir"])
def test_tiny_model_learns_synthetic_pets(template, request, tmp_path):
    tiny_model_dir = request.getfixturevalue(template)
    synthetic_pets.run(synthetic_pets.SyntheticPetsConfig(output_dir=str(tmp_path / "raw"), num_classes=NUM_CLASSES,
                                             images_per_class=40, image_size=64, seed=0))
    data = tmp_path / "prepared"
    manifest = prepare_dataset.run(prepare_dataset.PrepareDatasetConfig(source=str(tmp_path / "raw"),
                                                                        output_dir=str(data)))
    assert manifest["splits"]["train"]["num_examples"] == 160
    held_out = {e.id for e in shards.load_examples(data, "eval")}
    assert held_out and not held_out & {e.id for e in shards.load_examples(data, "train")}

    def evaluate_all(adapter_dir=None):
        return {
            mode: evaluate.run(evaluate.EvaluateConfig(
                model_dir=str(tiny_model_dir), adapter_dir=adapter_dir, dataset_dir=str(data),
                output_dir=str(tmp_path / f"eval-{mode}-{'tuned' if adapter_dir else 'base'}"), mode=mode,
                limit=80, batch_size=16))
            for mode in ("generate", "score")
        }

    baseline = evaluate_all()
    adapter = tmp_path / "adapter"
    trained = finetune.run(finetune.FinetuneConfig(model_dir=str(tiny_model_dir), dataset_dir=str(data),
                                                   output_dir=str(adapter), **tiny_model.CPU_DEMO_FINETUNE))
    tuned = evaluate_all(str(adapter))
    print({"template": template, "final_loss": trained["final_loss"], **{
        name: {"accuracy": {m: r["accuracy"] for m, r in runs.items()}, "unknown": runs["generate"]["unknown_rate"],
               "top5": runs["score"]["top5_accuracy"]} for name, runs in (("baseline", baseline), ("tuned", tuned))}})

    chance = 1 / NUM_CLASSES
    assert baseline["score"]["accuracy"] <= 2 * chance
    assert baseline["generate"]["accuracy"] <= 2 * chance
    for mode in ("generate", "score"):
        assert tuned[mode]["num_examples"] == 80
        assert tuned[mode]["accuracy"] >= 0.9, (mode, tuned[mode]["accuracy"])
        assert tuned[mode]["macro_f1"] >= 0.85
    assert tuned["generate"]["unknown_rate"] <= 0.1

