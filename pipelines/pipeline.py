"""The DAG: stage weights -> prepare dataset -> {baseline eval, fine-tune} -> tuned eval -> gate ->
merge/export -> eval of the export as served -> gate on the export.

``build_pipeline(options)`` returns the @dsl.pipeline function for one set of compile-time options
(image, resource preset, build identity); runtime parameters are the pipeline function's
arguments: the sources, a few pipeline-wide values, and one dict per step whose defaults are the
step config's (pipelines/params.py). Task display names are the role names below; local_run and
lineage find tasks by them.
No ``from __future__ import annotations``: KFP reads the pipeline signature's annotations as types.
"""

import types
from typing import Callable

from kfp import dsl

from components import registry as reg
from components import sources
from pipelines import params
from pipelines.components import build_components
from pipelines.options import PIPELINE_NAME, CompileOptions, Resources

# Display names of the tasks (what the Vertex UI shows, and what local_run/lineage look up).
RESOLVE_SOURCES = "resolve-sources"
STAGE_WEIGHTS = "stage-weights"
PREPARE_DATASET = "prepare-dataset"
EVALUATE_BASELINE = "evaluate-baseline"
FINETUNE = "finetune"
EVALUATE_TUNED = "evaluate-tuned"
GATE = "compare-accuracy"
MERGE_EXPORT = "merge-export"
EVALUATE_MERGED = "evaluate-merged"
ACCEPT_EXPORT = "accept-export"
RESOLVE_CHAMPION = "resolve-champion"
EVALUATE_CHAMPION = "evaluate-champion"
REGISTER = "register"
GATE_CONDITION_NAME = "tuned-beats-baseline"
ACCEPT_CONDITION_NAME = "export-accepted"
# The export as served: unquantised, in the dtype merge-export saved it (bf16 or fp32), whatever
# the pipeline's `quantization` (nf4 on CUDA is how the adapter is trained, not how it is served).
SERVED_EVAL = {"quantization": "none", "load_dtype": "saved"}

GPU_TASKS = (EVALUATE_BASELINE, FINETUNE, EVALUATE_TUNED, MERGE_EXPORT, EVALUATE_MERGED,
             EVALUATE_CHAMPION)
# Never cached: each run must see what the sources and the registry hold now, and a registration
# is an action, not a result to reuse.
UNCACHED_TASKS = (RESOLVE_SOURCES, RESOLVE_CHAMPION, REGISTER)
INGEST_TASKS = (STAGE_WEIGHTS, PREPARE_DATASET)
# Pipeline-wide parameters (the steps' dicts are params.STEPS), with their descriptions.
PIPELINE_WIDE = {
    "weights_source": "model to fine-tune: Hugging Face repo id, gs:// prefix or folder",
    "dataset_source": "dataset: Hugging Face id, gs:// prefix, folder or archives "
                      "(prepare_dataset.source_format says how to read it)",
    "weights_revision": "Hugging Face revision of the weights (branch, tag or sha)",
    "dataset_revision": "Hugging Face revision of the dataset (empty: main)",
    "hf_token_secret": "Secret Manager name (projects/P/secrets/S) of the Hugging Face token",
    "quantization": "how the fine-tune and the evaluations of the model as trained load it: "
                    "auto, nf4 or none",
    "registry": "model registry (projects/P/locations/L/models/ID or a folder; empty: none)",
    "serving_image": "serving container of a registered model",
}


def _apply(task: dsl.PipelineTask, resources: Resources) -> dsl.PipelineTask:
    task.set_cpu_limit(resources.cpu_limit).set_memory_limit(resources.memory_limit)
    if resources.accelerator_type:
        task.set_accelerator_type(resources.accelerator_type)
        task.set_accelerator_limit(resources.accelerator_count)
    return task


def _task_setter(options: CompileOptions) -> Callable:
    """Resources, display name and caching of a task, by its display name."""
    preset = options.preset

    def task(op_task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
        resources = (options.finetune_task if name == FINETUNE else
                     preset.gpu_task if name in GPU_TASKS else preset.cpu_task)
        _apply(op_task, resources)
        return op_task.set_display_name(name).set_caching_options(name not in UNCACHED_TASKS)

    return task


def _docstring() -> str:
    """The pipeline's description and its parameters' (KFP puts them in the YAML)."""
    lines = [f"    {name}: {text}" for name, text in PIPELINE_WIDE.items()]
    lines += [f"    {step}: {params.describe(step)}" for step in params.STEPS]
    return "QLoRA fine-tune of Gemma 4 for image classification.\n\nArgs:\n" + "\n".join(lines)


def _ingest(ops, task: Callable, build: dict, p) -> tuple:
    """(weights, dataset) staged from what the sources hold now."""
    # Uncached and cheap: what the sources are right now (hub sha, listing fingerprint). The
    # ingest steps take it as an input, so they re-run exactly when their source changed.
    now = task(ops.resolve_sources(weights_source=p.weights_source,
                                   weights_revision=p.weights_revision,
                                   dataset_source=p.dataset_source,
                                   dataset_revision=p.dataset_revision,
                                   hf_token_secret=p.hf_token_secret, build=build),
               RESOLVE_SOURCES).outputs
    weights = task(ops.stage_weights(source=p.weights_source, revision=now["weights_revision"],
                                     source_fingerprint=now["weights_fingerprint"],
                                     hf_token_secret=p.hf_token_secret, config=p.stage_weights,
                                     build=build), STAGE_WEIGHTS).outputs["weights"]
    dataset = task(ops.prepare_dataset(source=p.dataset_source, revision=now["dataset_revision"],
                                       source_fingerprint=now["dataset_fingerprint"],
                                       config=p.prepare_dataset, build=build),
                   PREPARE_DATASET).outputs["dataset"]
    return weights, dataset


def _train(ops, task: Callable, options: CompileOptions, p, weights, dataset):
    """The fine-tune task: retried, resuming from checkpoints kept per run."""
    tuning = task(ops.finetune(
        weights=weights, dataset=dataset, config=p.finetune, quantization=p.quantization,
        # One data-parallel process per GPU of the task (1 for a CPU task).
        num_processes=max(options.finetune_task.accelerator_count, 1), build=options.build,
        # Keyed by the run, not the task's output URI: a retry finds the checkpoints.
        checkpoint_dir=f"{dsl.PIPELINE_ROOT_PLACEHOLDER}/checkpoints/{dsl.PIPELINE_JOB_ID_PLACEHOLDER}/{FINETUNE}"),
        FINETUNE)
    # A preempted or failed fine-tune restarts and resumes from its last checkpoint;
    # backoff 60 s doubling, capped at one hour.
    tuning.set_retry(num_retries=options.finetune_retries, backoff_duration="60s",
                     backoff_factor=2.0, backoff_max_duration="3600s")
    return tuning.outputs["adapter"]


def _export(ops, task: Callable, build: dict, p, weights, dataset, adapter, evaluations) -> None:
    """Merge, evaluate the export as served, and register it if it passes the rule again, now
    also against the champion."""
    baseline, tuned, champion = evaluations
    export = task(ops.merge_export(weights=weights, adapter=adapter, dataset=dataset,
                                   tuned_evaluation=tuned, config=p.merge_export, build=build),
                  MERGE_EXPORT).outputs["export"]
    merged = task(ops.evaluate(weights=export, dataset=dataset, config=p.evaluate, build=build,
                               **SERVED_EVAL), EVALUATE_MERGED).outputs["evaluation"]
    accept = task(ops.accept_export(baseline=baseline, tuned=tuned, merged=merged,
                                    champion=champion, thresholds=p.gate, build=build),
                  ACCEPT_EXPORT)
    with dsl.If(accept.outputs["Output"] == True, name=ACCEPT_CONDITION_NAME):  # noqa: E712
        task(ops.register(registry=p.registry, serving_image=p.serving_image,
                          run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, export=export,
                          merged=merged, weights=weights, dataset=dataset, build=build), REGISTER)


def _wire(ops, task: Callable, options: CompileOptions, p) -> None:
    """The DAG over the run's parameters ``p`` (by name)."""
    build = options.build
    weights, dataset = _ingest(ops, task, build, p)
    as_trained = {"quantization": p.quantization,
                  "load_dtype": params.field_default("evaluate", "load_dtype")}
    baseline = task(ops.evaluate(weights=weights, dataset=dataset, config=p.evaluate, build=build,
                                 **as_trained), EVALUATE_BASELINE).outputs["evaluation"]
    # The champion, re-evaluated as served on this run's held-out shards (cached only while
    # both the champion and the shards are the same).
    champion = task(ops.resolve_champion(registry=p.registry, build=build), RESOLVE_CHAMPION)
    champion_eval = task(ops.evaluate_champion(
        registry=p.registry, champion_uri=champion.outputs["uri"],
        champion_version=champion.outputs["version"], dataset=dataset, config=p.evaluate,
        build=build, **SERVED_EVAL), EVALUATE_CHAMPION).outputs["evaluation"]
    adapter = _train(ops, task, options, p, weights, dataset)
    tuned = task(ops.evaluate(weights=weights, adapter=adapter, dataset=dataset, config=p.evaluate,
                              build=build, **as_trained), EVALUATE_TUNED).outputs["evaluation"]
    gate = task(ops.compare_accuracy(baseline=baseline, tuned=tuned, thresholds=p.gate,
                                     build=build), GATE)
    with dsl.If(gate.outputs["Output"] == True, name=GATE_CONDITION_NAME):  # noqa: E712 (KFP DSL)
        _export(ops, task, build, p, weights, dataset, adapter, (baseline, tuned, champion_eval))


def build_pipeline(options: CompileOptions) -> Callable:
    ops, task = build_components(options.image), _task_setter(options)
    step = {name: params.defaults(name) for name in params.STEPS}  # compiled into the YAML

    def gemma_pets_pipeline(
        weights_source: str,
        dataset_source: str,
        weights_revision: str = params.field_default("stage_weights", "revision"),
        dataset_revision: str = sources.ResolveSourceConfig.revision,
        hf_token_secret: str = "",
        quantization: str = params.field_default("finetune", "quantization"),
        registry: str = "",
        serving_image: str = reg.DEFAULT_SERVING_IMAGE,
        stage_weights: dict = step["stage_weights"],
        prepare_dataset: dict = step["prepare_dataset"],
        finetune: dict = step["finetune"],
        evaluate: dict = step["evaluate"],
        merge_export: dict = step["merge_export"],
        gate: dict = step["gate"],
    ):
        _wire(ops, task, options, types.SimpleNamespace(**locals()))  # the parameters, by name

    gemma_pets_pipeline.__doc__ = _docstring()
    return dsl.pipeline(
        name=PIPELINE_NAME,
        description=("QLoRA fine-tune of a Gemma 4 vision-language model for image "
                     f"classification (preset {options.preset.name}, image {options.image}, "
                     f"code {options.project_version} @ {options.git_commit})"),
    )(gemma_pets_pipeline)
