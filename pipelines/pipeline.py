"""The DAG: stage weights -> prepare dataset -> {baseline eval, fine-tune} -> tuned eval -> gate ->
merge/export -> eval of the export as served -> gate on the export.

``build_pipeline(options)`` returns the @dsl.pipeline function for one set of compile-time options
(image, resource preset, build identity); runtime parameters are the pipeline function's
arguments. Task display names are the role names below; local_run and lineage find tasks by them.
No ``from __future__ import annotations``: KFP reads the pipeline signature's annotations as types.

"Unset" is 0 / "" rather than an Optional parameter defaulting to None: kfp.local (2.17.3) cannot
run a pipeline whose Optional parameter is left unset (it fails converting the spec's empty
default) and refuses None as an argument, so the components map 0 / "" to the step's None.
"""

from typing import Callable

from kfp import dsl

from components import gate as rule
from components import registry as reg
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
GATED_TASKS = (MERGE_EXPORT, EVALUATE_MERGED, ACCEPT_EXPORT, REGISTER)
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
CPU_TASKS = (RESOLVE_SOURCES, STAGE_WEIGHTS, PREPARE_DATASET, GATE, ACCEPT_EXPORT,
             RESOLVE_CHAMPION, REGISTER)


def _apply(task: dsl.PipelineTask, resources: Resources) -> dsl.PipelineTask:
    task.set_cpu_limit(resources.cpu_limit).set_memory_limit(resources.memory_limit)
    if resources.accelerator_type:
        task.set_accelerator_type(resources.accelerator_type)
        task.set_accelerator_limit(resources.accelerator_count)
    return task


def build_pipeline(options: CompileOptions) -> Callable:
    ops = build_components(options.image)
    build = options.build
    preset = options.preset

    def task(op_task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
        resources = options.finetune_task if name == FINETUNE else preset.gpu_task if name in GPU_TASKS else preset.cpu_task
        _apply(op_task, resources)
        return op_task.set_display_name(name).set_caching_options(name not in UNCACHED_TASKS)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=("QLoRA fine-tune of a Gemma 4 vision-language model for image "
                     f"classification (preset {preset.name}, image {options.image}, "
                     f"code {options.project_version} @ {options.git_commit})"),
    )
    def gemma_pets_pipeline(
        weights_source: str,
        dataset_source: str,
        weights_revision: str = "main",
        hf_token_secret: str = "",
        dataset_format: str = "auto",
        dataset_revision: str = "",
        train_size: int = 0,
        eval_size: int = 0,
        num_classes: int = 0,
        seed: int = 0,
        quantization: str = "auto",
        lora_r: int = 64,
        lora_alpha: int = 64,
        lora_dropout: float = 0.05,
        learning_rate: float = 5e-5,
        epochs: int = 3,
        max_steps: int = 0,
        warmup_ratio: float = 0.1,
        batch_size: int = 16,
        micro_batch_size: int = 0,
        memory_preset: str = "auto",
        max_length: int = 2048,
        save_every_steps: int = 50,
        eval_mode: str = "generate",
        eval_batch_size: int = 0,
        eval_limit: int = 0,
        margin: float = rule.DEFAULT_MARGIN,
        min_accuracy: float = rule.DEFAULT_MIN_ACCURACY,
        export_tolerance: float = rule.DEFAULT_EXPORT_TOLERANCE,
        merge_tolerance: float = 0.0,
        merge_save_dtype: str = "bfloat16",
        registry: str = "",
        serving_image: str = reg.DEFAULT_SERVING_IMAGE,
    ):
        # Uncached and cheap: what the sources are right now (hub sha, listing fingerprint). The
        # ingest steps take it as an input, so they re-run exactly when their source changed.
        now = task(ops.resolve_sources(weights_source=weights_source,
                                       weights_revision=weights_revision,
                                       dataset_source=dataset_source,
                                       dataset_revision=dataset_revision,
                                       hf_token_secret=hf_token_secret, build=build),
                   RESOLVE_SOURCES).outputs
        weights = task(ops.stage_weights(source=weights_source, revision=now["weights_revision"],
                                         source_fingerprint=now["weights_fingerprint"],
                                         hf_token_secret=hf_token_secret, build=build),
                       STAGE_WEIGHTS).outputs["weights"]
        dataset = task(ops.prepare_dataset(source=dataset_source, source_format=dataset_format,
                                           revision=now["dataset_revision"],
                                           source_fingerprint=now["dataset_fingerprint"],
                                           train_size=train_size, eval_size=eval_size,
                                           num_classes=num_classes, seed=seed, build=build),
                       PREPARE_DATASET).outputs["dataset"]
        eval_args = dict(dataset=dataset, mode=eval_mode, batch_size=eval_batch_size,
                         limit=eval_limit, build=build)
        as_trained = dict(quantization=quantization, load_dtype="compute")
        baseline = task(ops.evaluate(weights=weights, **eval_args, **as_trained), EVALUATE_BASELINE)
        # The champion, re-evaluated as served on this run's held-out shards (cached only while
        # both the champion and the shards are the same).
        champion = task(ops.resolve_champion(registry=registry, build=build), RESOLVE_CHAMPION)
        champion_eval = task(ops.evaluate_champion(
            registry=registry, champion_uri=champion.outputs["uri"],
            champion_version=champion.outputs["version"], dataset=dataset, mode=eval_mode,
            batch_size=eval_batch_size, limit=eval_limit, build=build, **SERVED_EVAL),
            EVALUATE_CHAMPION)
        tuning = task(ops.finetune(
            weights=weights, dataset=dataset, quantization=quantization, lora_r=lora_r,
            lora_alpha=lora_alpha, lora_dropout=lora_dropout, learning_rate=learning_rate,
            epochs=epochs, max_steps=max_steps, warmup_ratio=warmup_ratio,
            batch_size=batch_size, micro_batch_size=micro_batch_size, memory_preset=memory_preset,
            # One data-parallel process per GPU of the task (1 for a CPU task).
            num_processes=max(options.finetune_task.accelerator_count, 1),
            max_length=max_length, seed=seed, save_every_steps=save_every_steps, build=build,
            # Keyed by the run, not the task's output URI: a retry finds the checkpoints.
            checkpoint_dir=f"{dsl.PIPELINE_ROOT_PLACEHOLDER}/checkpoints/{dsl.PIPELINE_JOB_ID_PLACEHOLDER}/{FINETUNE}"),
            FINETUNE)
        # A preempted or failed fine-tune restarts and resumes from its last checkpoint;
        # backoff 60 s doubling, capped at one hour.
        tuning.set_retry(num_retries=options.fine_tune_retries, backoff_duration="60s",
                         backoff_factor=2.0, backoff_max_duration="3600s")
        adapter = tuning.outputs["adapter"]
        tuned = task(ops.evaluate(weights=weights, adapter=adapter, **eval_args, **as_trained),
                     EVALUATE_TUNED)
        gate = task(ops.compare_accuracy(baseline=baseline.outputs["evaluation"],
                                         tuned=tuned.outputs["evaluation"], margin=margin,
                                         min_accuracy=min_accuracy, build=build), GATE)
        with dsl.If(gate.outputs["Output"] == True, name=GATE_CONDITION_NAME):  # noqa: E712 (KFP DSL)
            export = task(ops.merge_export(weights=weights, adapter=adapter, dataset=dataset,
                                           tuned_evaluation=tuned.outputs["evaluation"],
                                           tolerance=merge_tolerance,
                                           save_dtype=merge_save_dtype, build=build),
                          MERGE_EXPORT).outputs["export"]
            merged = task(ops.evaluate(weights=export, **eval_args, **SERVED_EVAL), EVALUATE_MERGED)
            # the export is handed on (registered) only if it, as served, passes the rule again,
            # now also against the champion
            accept = task(ops.accept_export(
                baseline=baseline.outputs["evaluation"], tuned=tuned.outputs["evaluation"],
                merged=merged.outputs["evaluation"], champion=champion_eval.outputs["evaluation"],
                margin=margin, min_accuracy=min_accuracy, export_tolerance=export_tolerance,
                build=build), ACCEPT_EXPORT)
            with dsl.If(accept.outputs["Output"] == True, name=ACCEPT_CONDITION_NAME):  # noqa: E712
                task(ops.register(registry=registry, serving_image=serving_image,
                                  run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, export=export,
                                  merged=merged.outputs["evaluation"], weights=weights,
                                  dataset=dataset, build=build), REGISTER)

    return gemma_pets_pipeline
