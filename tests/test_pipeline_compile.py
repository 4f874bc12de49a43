"""Compile the pipeline, load the YAML back into the PipelineSpec proto, check what Vertex will run."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

import compile as compile_cli
from components import finetune as finetune_step
from pipelines import components as pipeline_components
from pipelines import options as pipeline_options
from pipelines import params as step_params
from pipelines import pipeline as dag

from tests.helpers import REPO, is_commit_of_this_checkout
IMAGE = "europe-west4-docker.pkg.dev/acme/gemma-pets/trainer:9.9.9"
PLANTED = "hf_plantedSECRETcompile0123456789"


def load_spec(path: Path) -> tuple[pipeline_spec_pb2.PipelineSpec,
                                   pipeline_spec_pb2.PipelineDeploymentConfig]:
    raw = yaml.safe_load(path.read_text())
    spec = json_format.ParseDict(raw, pipeline_spec_pb2.PipelineSpec())
    deployment = json_format.ParseDict(json_format.MessageToDict(spec.deployment_spec),
                                       pipeline_spec_pb2.PipelineDeploymentConfig())
    return spec, deployment


def all_tasks(spec: pipeline_spec_pb2.PipelineSpec) -> dict[str, tuple[str, object]]:
    """display name -> (enclosing DAG's component name or 'root', task spec), nested DAGs too."""
    found: dict[str, tuple[str, object]] = {}

    def walk(dag_spec, owner: str) -> None:
        for task in dag_spec.tasks.values():
            found[task.task_info.name] = (owner, task)
            component = spec.components[task.component_ref.name]
            if component.WhichOneof("implementation") == "dag":
                walk(component.dag, task.component_ref.name)

    walk(spec.root.dag, "root")
    return found


def executor_of(spec, deployment, task) -> pipeline_spec_pb2.PipelineDeploymentConfig.ExecutorSpec:
    return deployment.executors[spec.components[task.component_ref.name].executor_label]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    compile_cli.compile_pipeline(path, preset="31b-qlora", image=IMAGE)
    return path


def test_dag_tasks_and_dependencies(compiled):
    spec, _ = load_spec(compiled)
    tasks = all_tasks(spec)
    assert set(tasks) == {dag.RESOLVE_SOURCES, dag.STAGE_WEIGHTS, dag.PREPARE_DATASET, dag.EVALUATE_BASELINE,
                          dag.FINETUNE, dag.EVALUATE_TUNED, dag.GATE, dag.GATE_CONDITION_NAME,
                          dag.MERGE_EXPORT, dag.EVALUATE_MERGED, dag.ACCEPT_EXPORT,
                          dag.RESOLVE_CHAMPION, dag.EVALUATE_CHAMPION, dag.ACCEPT_CONDITION_NAME,
                          dag.REGISTER}
    key_to_name = {key: t.task_info.name for key, t in spec.root.dag.tasks.items()}

    def upstream(name: str) -> set[str]:
        return {key_to_name[k] for k in tasks[name][1].dependent_tasks}

    # the ingest steps wait for what the sources are now, and take it as an input
    for name in dag.INGEST_TASKS:
        assert upstream(name) == {dag.RESOLVE_SOURCES}, name
        source_input = tasks[name][1].inputs.parameters["source_fingerprint"]
        assert source_input.task_output_parameter.producer_task == "resolve-sources"
    assert (tasks[dag.STAGE_WEIGHTS][1].inputs.parameters["revision"]
            .task_output_parameter.output_parameter_key) == "weights_revision"
    assert upstream(dag.FINETUNE) == {dag.STAGE_WEIGHTS, dag.PREPARE_DATASET}
    assert upstream(dag.EVALUATE_BASELINE) == {dag.STAGE_WEIGHTS, dag.PREPARE_DATASET}
    # baseline evaluation and fine-tuning run side by side: neither waits for the other
    assert dag.FINETUNE not in upstream(dag.EVALUATE_BASELINE)
    assert dag.FINETUNE in upstream(dag.EVALUATE_TUNED)
    assert upstream(dag.GATE) == {dag.EVALUATE_BASELINE, dag.EVALUATE_TUNED}
    # merge/export and the evaluation of the export sit inside the gate's condition
    condition_owner = tasks[dag.GATE_CONDITION_NAME][1].component_ref.name
    assert tasks[dag.MERGE_EXPORT][0] == condition_owner
    assert tasks[dag.EVALUATE_MERGED][0] == condition_owner
    condition_dag = spec.components[condition_owner].dag
    inner = {t.task_info.name: t for t in condition_dag.tasks.values()}
    merge_key = next(k for k, t in condition_dag.tasks.items()
                     if t.task_info.name == dag.MERGE_EXPORT)
    assert list(inner[dag.EVALUATE_MERGED].dependent_tasks) == [merge_key]
    # the export is accepted (handed on) only after its own evaluation, against the tuned one
    assert tasks[dag.ACCEPT_EXPORT][0] == condition_owner
    merged_key = next(k for k, t in condition_dag.tasks.items()
                      if t.task_info.name == dag.EVALUATE_MERGED)
    assert merged_key in inner[dag.ACCEPT_EXPORT].dependent_tasks
    # the champion is evaluated in this run, on this run's dataset, and the export gate reads it
    assert upstream(dag.EVALUATE_CHAMPION) == {dag.RESOLVE_CHAMPION, dag.PREPARE_DATASET}
    champion_input = inner[dag.ACCEPT_EXPORT].inputs.artifacts["champion"]
    assert champion_input.component_input_artifact.startswith("pipelinechannel--evaluate-champion")
    # registration only inside the export gate's own condition
    accept_owner = tasks[dag.ACCEPT_CONDITION_NAME][1].component_ref.name
    assert tasks[dag.ACCEPT_CONDITION_NAME][0] == condition_owner
    assert tasks[dag.REGISTER][0] == accept_owner
    accept_key = next(k for k, t in condition_dag.tasks.items()
                      if t.task_info.name == dag.ACCEPT_EXPORT)
    assert tasks[dag.ACCEPT_CONDITION_NAME][1].trigger_policy.condition == (
        f"inputs.parameter_values['pipelinechannel--{accept_key}-Output'] == true")


def constant_inputs(task) -> dict[str, object]:
    return {name: json_format.MessageToDict(value.runtime_value.constant)
            for name, value in task.inputs.parameters.items()
            if value.HasField("runtime_value")}


def test_merged_export_is_evaluated_as_served(compiled):
    """evaluate-merged loads the export unquantised in its saved dtype, whatever `quantization`
    says; the baseline and tuned evaluations follow `quantization` (as trained)."""
    spec, _ = load_spec(compiled)
    tasks = all_tasks(spec)
    for name in (dag.EVALUATE_MERGED, dag.EVALUATE_CHAMPION):  # both are exports, as served
        served = constant_inputs(tasks[name][1])
        assert (served["quantization"], served["load_dtype"]) == ("none", "saved"), name
    for name in (dag.EVALUATE_BASELINE, dag.EVALUATE_TUNED):
        task = tasks[name][1]
        assert constant_inputs(task)["load_dtype"] == "compute", name
        assert (task.inputs.parameters["quantization"].component_input_parameter
                == "quantization"), name


def test_gate_condition_compares_gate_output(compiled):
    spec, _ = load_spec(compiled)
    tasks = all_tasks(spec)
    gate_key = next(k for k, t in spec.root.dag.tasks.items() if t.task_info.name == dag.GATE)
    condition = tasks[dag.GATE_CONDITION_NAME][1].trigger_policy.condition
    assert condition == f"inputs.parameter_values['pipelinechannel--{gate_key}-Output'] == true"
    gate_component = spec.components[tasks[dag.GATE][1].component_ref.name]
    assert (gate_component.output_definitions.parameters["Output"].parameter_type
            == pipeline_spec_pb2.ParameterType.BOOLEAN)
    gate = spec.root.input_definitions.parameters["gate"]
    assert gate.parameter_type == pipeline_spec_pb2.ParameterType.STRUCT
    # the gate needs a strict improvement: the defaults are above zero
    for name in ("margin", "min_accuracy", "export_tolerance"):
        assert gate.default_value.struct_value.fields[name].number_value > 0, name


def test_accelerators_resources_caching_retry(compiled):
    spec, deployment = load_spec(compiled)
    assert set(dag.UNCACHED_TASKS) == {dag.RESOLVE_SOURCES, dag.RESOLVE_CHAMPION, dag.REGISTER}
    preset = pipeline_options.PRESETS["31b-qlora"]
    for name, (_, task) in all_tasks(spec).items():
        if name in (dag.GATE_CONDITION_NAME, dag.ACCEPT_CONDITION_NAME):
            continue
        # only the tasks that read what is true now are uncached
        assert task.caching_options.enable_cache is (name not in dag.UNCACHED_TASKS), name
        resources = executor_of(spec, deployment, task).container.resources
        want = preset.gpu_task if name in dag.GPU_TASKS else preset.cpu_task
        assert resources.resource_cpu_limit == want.cpu_limit, name
        assert resources.resource_memory_limit == want.memory_limit, name
        if name in dag.GPU_TASKS:
            assert resources.accelerator.resource_type == "NVIDIA_H100_80GB", name
            assert resources.accelerator.resource_count == "1", name
        else:
            assert not resources.accelerator.resource_type, name
        policy = task.retry_policy
        if name == dag.FINETUNE:
            assert policy.max_retry_count == 2
            assert policy.backoff_duration.seconds == 60
            assert policy.backoff_factor == 2.0
        else:
            assert policy.max_retry_count == 0, name


def test_small_model_preset_uses_l4(tmp_path):
    path = compile_cli.compile_pipeline(tmp_path / "e4b.yaml", preset="e4b", image=IMAGE,
                                        finetune_retries=1)
    spec, deployment = load_spec(path)
    tasks = all_tasks(spec)
    for name in dag.GPU_TASKS:
        accelerator = executor_of(spec, deployment, tasks[name][1]).container.resources.accelerator
        assert (accelerator.resource_type, accelerator.resource_count) == ("NVIDIA_L4", "1")
    assert tasks[dag.FINETUNE][1].retry_policy.max_retry_count == 1


def test_finetune_gpus_reach_the_task_and_the_step(tmp_path, compiled):
    """--finetune-gpus sets the fine-tune task's accelerator count (the other GPU tasks keep the
    preset's) and passes it to the step as its number of data-parallel processes."""
    path = compile_cli.compile_pipeline(tmp_path / "x2.yaml", preset="31b-qlora", image=IMAGE, finetune_gpus=2)
    for yaml_path, gpus in ((path, 2), (compiled, 1)):
        spec, deployment = load_spec(yaml_path)
        tasks = all_tasks(spec)
        for name in dag.GPU_TASKS:
            accelerator = executor_of(spec, deployment, tasks[name][1]).container.resources.accelerator
            assert accelerator.resource_count == str(gpus if name == dag.FINETUNE else 1), name
        processes = tasks[dag.FINETUNE][1].inputs.parameters["num_processes"].runtime_value.constant
        assert processes.number_value == gpus
    with pytest.raises(ValueError, match="--finetune-gpus 2: preset cpu-smoke has no accelerator"):
        compile_cli.compile_pipeline(tmp_path / "p.yaml", preset="cpu-smoke", image=IMAGE, finetune_gpus=2)
    for gpus in (0, 3, 5, 6, 7, 16):
        with pytest.raises(ValueError, match=rf"--finetune-gpus {gpus}: Vertex AI machines carry "
                                             r"1, 2, 4 or 8 NVIDIA_H100_80GB GPUs"):
            compile_cli.compile_pipeline(tmp_path / "p.yaml", image=IMAGE, finetune_gpus=gpus)


def test_rtx_pro_6000_preset_asks_vertex_for_the_seeds_gpu(tmp_path):
    path = compile_cli.compile_pipeline(tmp_path / "rtx.yaml", preset="31b-rtx-pro-6000", image=IMAGE)
    spec, deployment = load_spec(path)
    tasks = all_tasks(spec)
    for name in dag.GPU_TASKS:
        resources = executor_of(spec, deployment, tasks[name][1]).container.resources
        assert (resources.accelerator.resource_type, resources.accelerator.resource_count) == (
            "NVIDIA_RTX_PRO_6000", "1")
        assert (resources.resource_cpu_limit, resources.resource_memory_limit) == ("44", "170G")


def test_every_gpu_preset_fits_what_its_machine_leaves_a_task():
    for preset in pipeline_options.PRESETS.values():
        assert bool(preset.machine) == bool(preset.gpu_task.accelerator_type), preset.name
    # The GKE reservations Machine.allocatable models: 43.4 GiB of a 48 GiB g2-standard-12.
    cpu, gib = pipeline_options.PRESETS["e4b"].machine.allocatable()
    assert (round(cpu, 2), round(gib, 1)) == (11.9, 43.4)
    # All 48 GB of the machine is more than it leaves a task (what e4b asked for before).
    e4b = pipeline_options.PRESETS["e4b"]
    with pytest.raises(ValueError, match=r"preset e4b: cpu 12 / memory 48G is more than "
                                         r"g2-standard-12 leaves a task \(11.90 vCPU, 43.4 GiB\)"):
        dataclasses.replace(e4b, gpu_task=dataclasses.replace(e4b.gpu_task, cpu_limit="12",
                                                              memory_limit="48G"))


def test_tasks_run_the_image_without_installing_anything(compiled):
    spec, deployment = load_spec(compiled)
    for name, (_, task) in all_tasks(spec).items():
        if name in (dag.GATE_CONDITION_NAME, dag.ACCEPT_CONDITION_NAME):
            continue
        container = executor_of(spec, deployment, task).container
        assert container.image == IMAGE, name
        command = "\n".join([*container.command, *container.args])
        assert "pip install" not in command, name
        assert "kfp.dsl.executor_main" in command, name
    finetune = executor_of(spec, deployment, all_tasks(spec)[dag.FINETUNE][1]).container
    assert 'params.run_step(\n        "finetune", config' in "\n".join(finetune.command)


def test_build_identity_is_a_constant_input_of_every_task(compiled):
    spec, _ = load_spec(compiled)
    for name, (_, task) in all_tasks(spec).items():
        if name in (dag.GATE_CONDITION_NAME, dag.ACCEPT_CONDITION_NAME):
            continue
        build = json_format.MessageToDict(task.inputs.parameters["build"].runtime_value.constant)
        assert build["image"] == IMAGE, name
        assert build["project_version"] == pipeline_options.project_version(), name
        assert is_commit_of_this_checkout(build["git_commit"]), name


def test_runtime_parameters(compiled):
    spec, _ = load_spec(compiled)
    params = spec.root.input_definitions.parameters
    # the pipeline-wide parameters and one dict per step, nothing else
    assert set(params) == set(dag.PIPELINE_WIDE) | set(step_params.STEPS)
    # no public default exists offline for the weights and data: the caller must name them
    assert not params["weights_source"].HasField("default_value")
    assert not params["dataset_source"].HasField("default_value")
    assert params["hf_token_secret"].default_value.string_value == ""
    assert params["registry"].default_value.string_value == ""  # no registry unless named
    assert "pytorch-vllm-serve" in params["serving_image"].default_value.string_value
    assert params["quantization"].default_value.string_value == "auto"
    assert not any("token" in p and p != "hf_token_secret" for p in params)
    # every parameter says what it is in the YAML (the Vertex UI shows it)
    assert all(params[name].description for name in params)
    assert "unset by default (null): max_steps" in params["finetune"].description


def test_step_parameters_are_the_step_configs_defaults(compiled):
    """Each step's dict parameter defaults to its config dataclass's defaults, key for key: no
    0 / "" stands for "unset" (a None default is left out: the task fills it in), and the fields
    the pipeline sets itself are not keys."""
    spec, _ = load_spec(compiled)
    params = spec.root.input_definitions.parameters
    for step, wiring in step_params.STEPS.items():
        assert params[step].parameter_type == pipeline_spec_pb2.ParameterType.STRUCT, step
        compiled_default = json_format.MessageToDict(params[step].default_value)
        fields = {f.name: f for f in dataclasses.fields(step_params.config_class(step))}
        assert set(wiring.wired) <= set(fields), step
        tunable = {n for n in fields if n not in wiring.wired}
        assert set(compiled_default) <= tunable, step
        for name in tunable:
            f = fields[name]
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if default is None:
                assert name not in compiled_default, (step, name)
            else:
                assert compiled_default[name] == default, (step, name, compiled_default[name])
    finetune = json_format.MessageToDict(params["finetune"].default_value)
    assert finetune["lora_r"] == 64 and "max_steps" not in finetune and "model_dir" not in finetune
    merge = json_format.MessageToDict(params["merge_export"].default_value)
    assert "tolerance" not in merge and merge["save_dtype"] == "bfloat16"


@dataclasses.dataclass
class WithNewFlag(finetune_step.FinetuneConfig):
    """FinetuneConfig with one more field, as a new flag of the step would add it."""

    new_flag: int = dataclasses.field(default=7, metadata={"help": "a flag added to the step"})


class Captured(Exception):
    pass


def test_a_new_finetune_field_is_a_pipeline_key_with_no_other_edit(tmp_path, monkeypatch):
    """A field added to FinetuneConfig (here by a subclass standing in for the edit) is in the
    compiled finetune defaults, and the fine-tune task's body hands it to the step."""
    monkeypatch.setattr(finetune_step, "FinetuneConfig", WithNewFlag)
    spec, _ = load_spec(compile_cli.compile_pipeline(tmp_path / "p.yaml", image=IMAGE))
    finetune = json_format.MessageToDict(spec.root.input_definitions.parameters["finetune"].default_value)
    assert finetune["new_flag"] == 7

    def run(config):
        raise Captured(config)

    monkeypatch.setattr(finetune_step, "run", run)
    folder = types.SimpleNamespace(path=str(tmp_path), metadata={})
    for given, want in (({"new_flag": 9.0, "epochs": 1.0}, 9), ({}, 7)):  # KFP hands ints as floats
        with pytest.raises(Captured) as caught:
            pipeline_components.finetune(
                weights=folder, dataset=folder, config=given, quantization="none",
                num_processes=1, checkpoint_dir="", build={}, adapter=folder,
                train_metrics=folder, curve=folder, loss_series=folder)
        (config,) = caught.value.args
        assert isinstance(config, WithNewFlag) and config.new_flag == want
        assert config.epochs == given.get("epochs", 3) and isinstance(config.epochs, int)
        assert config.model_dir == str(tmp_path) and config.quantization == "none"


def test_step_keys_are_checked_naming_the_step_and_the_key():
    with pytest.raises(ValueError, match=r"parameter finetune.lora_rank: finetune has no key "
                                         r"'lora_rank'; its keys: .*lora_r"):
        step_params.check("finetune", {"lora_rank": 8})
    with pytest.raises(ValueError, match="parameter evaluate.model_dir: the pipeline sets"):
        step_params.check("evaluate", {"model_dir": "x"})
    with pytest.raises(ValueError, match=r"parameter finetune.epochs='two': expected int"):
        step_params.check("finetune", {"epochs": "two"})
    with pytest.raises(ValueError, match=r"parameter finetune.epochs=1.5: expected int"):
        step_params.check("finetune", {"epochs": 1.5})
    with pytest.raises(ValueError, match="parameter finetune.epochs may not be null"):
        step_params.check("finetune", {"epochs": None})
    with pytest.raises(ValueError, match="parameter finetune: --lora-dropout must be in"):
        step_params.check_values("finetune", {"lora_dropout": 1.5})
    # Every step's own defaults pass the pre-run check (stage_weights' once failed on its stand-in
    # source folder), and a bad value is refused before any task even where the step checks folders.
    for step in step_params.STEPS:
        step_params.check_values(step, step_params.defaults(step))
    with pytest.raises(ValueError, match="parameter merge_export: --tolerance must be >= 0"):
        step_params.check_values("merge_export", {"tolerance": -1.0})
    with pytest.raises(ValueError, match="parameter stage_weights: --max-workers must be >= 1"):
        step_params.check_values("stage_weights", {"max_workers": 0})
    # a value the 0 / "" spelling could not carry: a tolerance of 0, and null = the default
    assert step_params.check("merge_export", {"tolerance": 0, "device": "cpu"}) == {
        "tolerance": 0.0, "device": "cpu"}
    assert step_params.check("finetune", {"max_steps": None, "lora_r": 8.0}) == {"lora_r": 8}
    with pytest.raises(TypeError, match="the component sets"):  # components.py and STEPS disagree
        step_params.step_config("gate", {}, margin=0.1)


def test_bad_options_fail_naming_the_flag(tmp_path, capsys):
    with pytest.raises(ValueError, match="--preset"):
        compile_cli.compile_pipeline(tmp_path / "p.yaml", preset="70b")
    with pytest.raises(ValueError, match="--image"):
        compile_cli.compile_pipeline(tmp_path / "p.yaml", image="has space:1")
    assert compile_cli.main(["--output", str(tmp_path / "p.txt")]) == 2
    assert "--output" in capsys.readouterr().err


def test_compile_cli_never_imports_torch_and_never_writes_the_token(tmp_path):
    out = tmp_path / "pipeline.yaml"
    code = ("import sys, runpy; sys.argv=['compile.py','--output',%r];"
            "import pipelines.pipeline, pipelines.runtime, pipelines.local_run, pipelines.submit, "
            "pipelines.lineage;"
            "\ntry:\n    runpy.run_path('compile.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n" % str(out))
    env = {**os.environ, "HF_TOKEN": PLANTED, "HUGGING_FACE_HUB_TOKEN": PLANTED}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert PLANTED not in out.read_text()
    assert PLANTED not in result.stdout + result.stderr
