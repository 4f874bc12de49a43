"""One thin KFP component per step: wire artifact paths into the step's ``run(Config(...))``.

The bodies are lightweight Python components: KFP copies each function's source into the task
command, so every import sits inside the body and no module-level name is visible there. They run
in the project's image, which has ``components``, ``pipelines`` and kfp installed, so nothing is
pip-installed at run time (packages_to_install=[], install_kfp_package=False). The same
definitions run under kfp.local's SubprocessRunner (in this venv) and on Vertex AI Pipelines.

``build`` is a constant input (project version, git commit, image) fixed at compile time, so a
task's cache key changes with the code and every artifact records the code that made it.
No ``from __future__ import annotations`` here: KFP reads the annotations as types.
A 0 / "" parameter means "unset" (the step's None); see pipelines/pipeline.py for why.
"""

import types
from typing import NamedTuple, Optional

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output


def resolve_sources(weights_source: str, weights_revision: str, dataset_source: str,
                    dataset_revision: str, hf_token_secret: str, build: dict,
                    ) -> NamedTuple("Sources", weights_revision=str, weights_fingerprint=str,
                                    dataset_revision=str, dataset_fingerprint=str):
    from components import sources
    from pipelines import runtime

    runtime.load_hf_token(hf_token_secret)  # gated hub repos need it to be resolved
    weights = sources.run(sources.ResolveSourceConfig(source=weights_source, kind="model",
                                                      revision=weights_revision))
    dataset = sources.run(sources.ResolveSourceConfig(source=dataset_source, kind="dataset",
                                                      revision=dataset_revision))
    print(f"weights {weights}\ndataset {dataset}")
    # a hub source is staged at the sha resolved here, so the fingerprint names what is staged
    return (weights["resolved_revision"] or weights_revision, weights["fingerprint"],
            dataset["resolved_revision"] or dataset_revision, dataset["fingerprint"])


def stage_weights(source: str, revision: str, source_fingerprint: str, hf_token_secret: str,
                  build: dict, weights: Output[Model]):
    from components import stage_weights as step
    from pipelines import runtime

    runtime.load_hf_token(hf_token_secret)  # Vertex: Secret Manager -> this task's env only
    step.run(step.StageWeightsConfig(source=source, destination=weights.path, revision=revision))
    runtime.annotate([weights], runtime.lineage(build, model_dir=weights.path))
    weights.metadata["weights_source_fingerprint"] = source_fingerprint


def prepare_dataset(source: str, source_format: str, revision: str, source_fingerprint: str,
                    train_size: int, eval_size: int, num_classes: int, seed: int, build: dict,
                    dataset: Output[Dataset]):
    from components import prepare_dataset as step
    from pipelines import runtime

    step.run(step.PrepareDatasetConfig(source=source, output_dir=dataset.path,
                                       source_format=source_format, revision=revision or None,
                                       train_size=train_size or None,
                                       eval_size=eval_size or None,
                                       num_classes=num_classes or None, seed=seed))
    runtime.annotate([dataset], runtime.lineage(build, dataset_dir=dataset.path))
    dataset.metadata["dataset_source_fingerprint"] = source_fingerprint


def finetune(weights: Input[Model], dataset: Input[Dataset], quantization: str, lora_r: int,
             lora_alpha: int, lora_dropout: float, learning_rate: float, epochs: int,
             max_steps: int, warmup_ratio: float, batch_size: int, micro_batch_size: int,
             memory_preset: str, num_processes: int, max_length: int, seed: int,
             save_every_steps: int, checkpoint_dir: str, build: dict, adapter: Output[Model],
             train_metrics: Output[Metrics], curve: Output[HTML], loss_series: Output[Artifact]):
    from components import finetune as step
    from pipelines import runtime

    result = step.run(step.FinetuneConfig(
        model_dir=weights.path, dataset_dir=dataset.path, output_dir=adapter.path,
        quantization=quantization, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        learning_rate=learning_rate, epochs=epochs, max_steps=max_steps or None,
        warmup_ratio=warmup_ratio, batch_size=batch_size, micro_batch_size=micro_batch_size,
        memory_preset=memory_preset, num_processes=num_processes, max_length=max_length, seed=seed,
        save_every_steps=save_every_steps, checkpoint_dir=checkpoint_dir))
    for key in ("final_loss", "steps", "samples_per_s", "peak_memory_mb"):
        if isinstance(result.get(key), (int, float)):
            train_metrics.log_metric(key, float(result[key]))
    runtime.publish_training_curve(adapter.path, curve, loss_series)
    runtime.annotate([adapter, train_metrics, curve, loss_series], runtime.lineage(
        build, model_dir=weights.path, dataset_dir=dataset.path, adapter_dir=adapter.path))
    runtime.write_metadata_file([train_metrics])


def evaluate(weights: Input[Model], dataset: Input[Dataset], mode: str, batch_size: int,
             limit: int, quantization: str, load_dtype: str, build: dict,
             evaluation: Output[Artifact],
             metrics: Output[Metrics], confusion: Output[ClassificationMetrics],
             adapter: Optional[Input[Model]] = None):
    from components import evaluate as step
    from pipelines import runtime

    adapter_dir = adapter.path if adapter is not None else None
    step.run(step.EvaluateConfig(model_dir=weights.path, dataset_dir=dataset.path,
                                 output_dir=evaluation.path, adapter_dir=adapter_dir, mode=mode,
                                 batch_size=batch_size, limit=limit or None,
                                 quantization=quantization, load_dtype=load_dtype))
    runtime.publish_evaluation(evaluation.path, metrics, confusion)
    runtime.annotate([evaluation, metrics, confusion], runtime.lineage(
        build, model_dir=weights.path, dataset_dir=dataset.path, adapter_dir=adapter_dir))
    runtime.write_metadata_file([metrics, confusion])


def compare_accuracy(baseline: Input[Artifact], tuned: Input[Artifact], margin: float,
                     min_accuracy: float, build: dict, report: Output[HTML]) -> bool:
    from components import gate as rule
    from pipelines import runtime

    tuned_lineage = {k: v for k, v in tuned.metadata.items() if k in runtime.LINEAGE_KEYS}
    return runtime.gate({"baseline": baseline.path, "tuned": tuned.path},
                        rule.Thresholds(margin=margin, min_accuracy=min_accuracy), report, build,
                        tuned_lineage, "Gate before the merge: tuned vs baseline")


def accept_export(baseline: Input[Artifact], tuned: Input[Artifact], merged: Input[Artifact],
                  champion: Input[Artifact], margin: float, min_accuracy: float,
                  export_tolerance: float, build: dict, report: Output[HTML]) -> bool:
    from components import gate as rule
    from pipelines import runtime

    merged_lineage = {k: v for k, v in merged.metadata.items() if k in runtime.LINEAGE_KEYS}
    passed = runtime.gate(
        {"baseline": baseline.path, "tuned": tuned.path, "merged": merged.path,
         "champion": champion.path},
        rule.Thresholds(margin=margin, min_accuracy=min_accuracy,
                        export_tolerance=export_tolerance),
        report, build, merged_lineage, "Gate after the merge: the export as served")
    report.metadata["export_status"] = runtime.export_status(
        {"passed": passed, "failed": report.metadata.get("gate_failed", [])})
    report.metadata["champion_version"] = champion.metadata.get("champion_version", "")
    return passed


def resolve_champion(registry: str, build: dict) -> NamedTuple("Champion", uri=str, version=str):
    from components import registry as reg

    found = reg.open_registry(registry)
    champion = found.champion() if found is not None else None
    print(f"champion in {registry or '(no registry)'}: {champion}")
    return (champion.artifact_uri, champion.version_id) if champion else ("", "")


def evaluate_champion(registry: str, champion_uri: str, champion_version: str,
                      dataset: Input[Dataset], mode: str, batch_size: int, limit: int,
                      quantization: str, load_dtype: str, build: dict,
                      evaluation: Output[Artifact]):
    from components import evaluate as step
    from pipelines import runtime

    runtime.annotate([evaluation], runtime.lineage(build, dataset_dir=dataset.path))
    if not champion_uri:
        runtime.record_no_champion(evaluation.path, registry)
        evaluation.metadata["champion_version"] = ""
        return
    # the champion as served, on this run's held-out shards: past numbers do not count
    step.run(step.EvaluateConfig(model_dir=runtime.readable_path(champion_uri),
                                 dataset_dir=dataset.path, output_dir=evaluation.path, mode=mode,
                                 batch_size=batch_size, limit=limit or None,
                                 quantization=quantization, load_dtype=load_dtype))
    runtime.annotate([evaluation], runtime.lineage(build, model_dir=runtime.readable_path(
        champion_uri), dataset_dir=dataset.path))
    evaluation.metadata.update(champion_uri=champion_uri, champion_version=champion_version)


def register(registry: str, serving_image: str, run_name: str, export: Input[Model],
             merged: Input[Artifact], weights: Input[Model], dataset: Input[Dataset],
             build: dict, registration: Output[Artifact]):
    from pipelines import runtime

    record = {**weights.metadata, **dataset.metadata, **export.metadata, "pipeline_run": run_name}
    runtime.register(registry, serving_image, export, merged.path, record, registration)
    runtime.annotate([registration], runtime.lineage(build, model_dir=export.path,
                                                     dataset_dir=dataset.path))


def merge_export(weights: Input[Model], adapter: Input[Model], dataset: Input[Dataset],
                 tuned_evaluation: Input[Artifact], tolerance: float, save_dtype: str,
                 build: dict, export: Output[Model]):
    from components import merge_export as step
    from pipelines import runtime

    result = step.run(step.MergeExportConfig(
        model_dir=weights.path, adapter_dir=adapter.path, output_dir=export.path,
        dataset_dir=dataset.path, metrics_path=f"{tuned_evaluation.path}/metrics.json",
        tolerance=tolerance or None, save_dtype=save_dtype))
    tuned = runtime.load_metrics(tuned_evaluation.path)
    runtime.annotate([export], runtime.lineage(build, model_dir=weights.path,
                                               dataset_dir=dataset.path, adapter_dir=adapter.path))
    export.metadata.update({f"tuned_{k}": float(tuned[k])
                            for k in ("accuracy", "macro_f1", "unknown_rate")})
    if isinstance(result.get("max_abs_logit_diff"), (int, float)):
        export.metadata["max_abs_logit_diff"] = float(result["max_abs_logit_diff"])


STEP_FUNCTIONS = (resolve_sources, stage_weights, prepare_dataset, finetune, evaluate, compare_accuracy,
                  merge_export, accept_export, resolve_champion, evaluate_champion, register)


def build_components(image: str) -> types.SimpleNamespace:
    """The KFP components, all running in ``image`` with nothing installed at run time."""
    return types.SimpleNamespace(**{
        func.__name__: dsl.component(func, base_image=image, packages_to_install=[],
                                     install_kfp_package=False)
        for func in STEP_FUNCTIONS})
