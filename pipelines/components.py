"""One thin KFP component per step: wire artifact paths into the step's ``run(Config(...))``.

The bodies are lightweight Python components: KFP copies each function's source into the task
command, so every import sits inside the body and no module-level name is visible there. They run
in the project's image, which has ``components``, ``pipelines`` and kfp installed, so nothing is
pip-installed at run time (packages_to_install=[], install_kfp_package=False). The same
definitions run under kfp.local's SubprocessRunner (in this venv) and on Vertex AI Pipelines.

``build`` is a constant input (project version, git commit, image) fixed at compile time, so a
task's cache key changes with the code and every artifact records the code that made it.
No ``from __future__ import annotations`` here: KFP reads the annotations as types.
A step's ``config: dict`` holds the keys of its config dataclass the run sets; the rest of the
fields come from the artifacts (pipelines/params.py says which, and merges the defaults in).
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
                  config: dict, build: dict, weights: Output[Model]):
    from pipelines import params, runtime

    runtime.load_hf_token(hf_token_secret)  # Vertex: Secret Manager -> this task's env only
    params.run_step("stage_weights", config, source=source, destination=weights.path,
                    revision=revision)
    runtime.annotate([weights], runtime.lineage(build, model_dir=weights.path))
    weights.metadata["weights_source_fingerprint"] = source_fingerprint


def prepare_dataset(source: str, revision: str, source_fingerprint: str, config: dict,
                    build: dict, dataset: Output[Dataset]):
    from pipelines import params, runtime

    # resolve-sources outputs "" for a source without a revision (a folder, gs://)
    params.run_step("prepare_dataset", config, source=source, output_dir=dataset.path,
                    revision=revision or None)
    runtime.annotate([dataset], runtime.lineage(build, dataset_dir=dataset.path))
    dataset.metadata["dataset_source_fingerprint"] = source_fingerprint


def finetune(weights: Input[Model], dataset: Input[Dataset], config: dict, quantization: str,
             num_processes: int, checkpoint_dir: str, build: dict, adapter: Output[Model],
             train_metrics: Output[Metrics], curve: Output[HTML], loss_series: Output[Artifact]):
    from pipelines import params, runtime

    result = params.run_step(
        "finetune", config, model_dir=weights.path, dataset_dir=dataset.path,
        output_dir=adapter.path, checkpoint_dir=checkpoint_dir, quantization=quantization,
        num_processes=num_processes)
    for key in ("final_loss", "steps", "samples_per_s", "peak_memory_mb"):
        if isinstance(result.get(key), (int, float)):
            train_metrics.log_metric(key, float(result[key]))
    runtime.publish_training_curve(adapter.path, curve, loss_series)
    runtime.annotate([adapter, train_metrics, curve, loss_series], runtime.lineage(
        build, model_dir=weights.path, dataset_dir=dataset.path, adapter_dir=adapter.path))
    runtime.write_metadata_file([train_metrics])


def evaluate(weights: Input[Model], dataset: Input[Dataset], config: dict, quantization: str,
             load_dtype: str, build: dict, evaluation: Output[Artifact],
             metrics: Output[Metrics], confusion: Output[ClassificationMetrics],
             adapter: Optional[Input[Model]] = None):
    from pipelines import params, runtime

    adapter_dir = adapter.path if adapter is not None else None
    params.run_step("evaluate", config, model_dir=weights.path, dataset_dir=dataset.path,
                    output_dir=evaluation.path, adapter_dir=adapter_dir,
                    quantization=quantization, load_dtype=load_dtype)
    runtime.publish_evaluation(evaluation.path, metrics, confusion)
    runtime.annotate([evaluation, metrics, confusion], runtime.lineage(
        build, model_dir=weights.path, dataset_dir=dataset.path, adapter_dir=adapter_dir))
    runtime.write_metadata_file([metrics, confusion])


def compare_accuracy(baseline: Input[Artifact], tuned: Input[Artifact], thresholds: dict,
                     build: dict, report: Output[HTML]) -> bool:
    from pipelines import params, runtime

    tuned_lineage = {k: v for k, v in tuned.metadata.items() if k in runtime.LINEAGE_KEYS}
    return runtime.gate({"baseline": baseline.path, "tuned": tuned.path},
                        params.step_config("gate", thresholds), report, build,
                        tuned_lineage, "Gate before the merge: tuned vs baseline")


def accept_export(baseline: Input[Artifact], tuned: Input[Artifact], merged: Input[Artifact],
                  champion: Input[Artifact], thresholds: dict, build: dict,
                  report: Output[HTML]) -> bool:
    from pipelines import params, runtime

    merged_lineage = {k: v for k, v in merged.metadata.items() if k in runtime.LINEAGE_KEYS}
    passed = runtime.gate(
        {"baseline": baseline.path, "tuned": tuned.path, "merged": merged.path,
         "champion": champion.path}, params.step_config("gate", thresholds),
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
                      dataset: Input[Dataset], config: dict, quantization: str, load_dtype: str,
                      build: dict, evaluation: Output[Artifact]):
    from pipelines import params, runtime

    runtime.annotate([evaluation], runtime.lineage(build, dataset_dir=dataset.path))
    if not champion_uri:
        runtime.record_no_champion(evaluation.path, registry)
        evaluation.metadata["champion_version"] = ""
        return
    # the champion as served, on this run's held-out shards: past numbers do not count
    params.run_step("evaluate", config, model_dir=runtime.readable_path(champion_uri),
                    dataset_dir=dataset.path, output_dir=evaluation.path, adapter_dir=None,
                    quantization=quantization, load_dtype=load_dtype)
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
                 tuned_evaluation: Input[Artifact], config: dict, build: dict,
                 export: Output[Model]):
    from components import artifacts
    from pipelines import params, runtime

    result = params.run_step(
        "merge_export", config, model_dir=weights.path, adapter_dir=adapter.path,
        output_dir=export.path, dataset_dir=dataset.path,
        metrics_path=f"{tuned_evaluation.path}/{artifacts.EVAL_METRICS}")
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
