"""The pipeline's step parameters, derived from the step config dataclasses (the one definition).

Each step the pipeline tunes has one ``dict`` pipeline parameter named after the step
(``finetune``, ``evaluate`` ...). Its keys are the step config's fields except those the pipeline
fills itself (``wired``: artifact paths, values from another task or a pipeline-wide parameter);
its compiled default is the dataclass's defaults. A run gives only the keys it changes: the task
merges them over the dataclass defaults, so a new field of a step config is a new key with no
other edit. A field whose default is None is left out of the compiled default (KFP cannot put a
null in a default, and kfp.local cannot pass one); leaving a key out gives the default, so null
and "left out" mean the same. An unknown key fails naming the step and the key, at submit / local
run and again in the task.

Importing a step module here is cheap: the step modules import torch only inside functions.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from typing import Any, Mapping

from components.cli import UserError


@dataclasses.dataclass(frozen=True)
class Step:
    module: str
    config: str
    wired: tuple[str, ...]  # fields the pipeline sets; every other field is a key of the dict


# Pipeline parameter name -> the step config it carries. `quantization` is one pipeline-wide
# parameter: the fine-tune and the evaluations of the model as trained must load it the same way.
STEPS = {
    "stage_weights": Step("components.stage_weights", "StageWeightsConfig",
                          ("source", "destination", "revision")),
    "prepare_dataset": Step("components.prepare_dataset", "PrepareDatasetConfig",
                            ("source", "output_dir", "revision")),
    "finetune": Step("components.finetune", "FinetuneConfig",
                     ("model_dir", "dataset_dir", "output_dir", "checkpoint_dir", "quantization",
                      "num_processes")),
    "evaluate": Step("components.evaluate", "EvaluateConfig",
                     ("model_dir", "dataset_dir", "output_dir", "adapter_dir", "quantization",
                      "load_dtype")),
    "merge_export": Step("components.merge_export", "MergeExportConfig",
                         ("model_dir", "adapter_dir", "output_dir", "dataset_dir", "metrics_path")),
    "gate": Step("components.gate", "Thresholds", ()),
}


def config_class(step: str) -> type:
    spec = STEPS[step]
    return getattr(importlib.import_module(spec.module), spec.config)


def _fields(step: str) -> dict[str, tuple[dataclasses.Field, Any]]:
    """Tunable field name -> (field, resolved type)."""
    cls = config_class(step)
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)
            if f.init and f.name not in STEPS[step].wired}


def keys(step: str) -> list[str]:
    """The keys the step's dict parameter takes."""
    return list(_fields(step))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def field_default(step: str, name: str) -> Any:
    """A field's default, wired or not (pipeline-wide parameters take theirs from here)."""
    (found,) = [f for f in dataclasses.fields(config_class(step)) if f.name == name]
    return _default(found)


def defaults(step: str) -> dict[str, Any]:
    """The compiled default of the step's dict parameter: every tunable non-None default."""
    out = {}
    for name, (f, _) in _fields(step).items():
        value = _default(f)
        if value is dataclasses.MISSING:
            raise TypeError(f"{STEPS[step].config}.{name} has no default and the pipeline does not "
                            f"set it: add it to STEPS[{step!r}].wired and wire it")
        if value is not None:
            out[name] = value
    return out


def describe(step: str) -> str:
    """What the step's dict parameter holds, for the pipeline's parameter descriptions."""
    spec = STEPS[step]
    unset = [n for n, (f, _) in _fields(step).items() if _default(f) is None]
    text = (f"fields of {spec.config} ({spec.module.replace('.', '/')}.py); give only the keys to "
            "change, the others keep their defaults")
    if unset:
        text += f"; unset by default (null): {', '.join(unset)}"
    return text + (f"; set by the pipeline: {', '.join(spec.wired)}" if spec.wired else "")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(label: str, value: Any, tp: Any) -> Any:
    """``value`` as the field's type. JSON has one number type: KFP hands an int back as 2.0."""
    if tp is bool and isinstance(value, bool) or tp is str and isinstance(value, str):
        return value
    if tp is int and not isinstance(value, bool) and isinstance(value, (int, float)) \
            and float(value).is_integer():
        return int(value)
    if tp is float and not isinstance(value, bool) and isinstance(value, (int, float)):
        return float(value)
    if typing.get_origin(tp) is list and isinstance(value, list):
        (item,) = typing.get_args(tp)
        return [_coerce(label, v, item) for v in value]
    name = getattr(tp, "__name__", str(tp))
    raise UserError(f"parameter {label}={value!r}: expected {name}")


def check(step: str, values: Any) -> dict[str, Any]:
    """The keys given for ``step``, checked and typed; nulls dropped (null is the default)."""
    if not isinstance(values, Mapping):
        raise UserError(f"parameter {step}={values!r}: expected a mapping of {STEPS[step].config} "
                        "fields")
    fields, out = _fields(step), {}
    for key, value in values.items():
        label = f"{step}.{key}"
        if key in STEPS[step].wired:
            raise UserError(f"parameter {label}: the pipeline sets {key} of {step} itself")
        if key not in fields:
            raise UserError(f"parameter {label}: {step} has no key {key!r}; its keys: "
                            f"{', '.join(fields)}")
        f, tp = fields[key]
        tp, optional = _base_type(tp)
        if value is None:
            if not optional or _default(f) is not None:
                raise UserError(f"parameter {label} may not be null")
            continue
        out[key] = _coerce(label, value, tp)
    return out


def check_values(step: str, values: Mapping[str, Any]) -> None:
    """Run the step config's own checks on ``values`` before any task runs, the wired fields
    standing in as their defaults or a gs:// location (checked remotely in the task, not here).
    A config checks its values before its local folders, so a folder not found ends only the
    checks of folders, which are the task's to make."""
    cls = config_class(step)
    stand_in = {f.name: _default(f) if _default(f) is not dataclasses.MISSING else f"gs://stand-in/{f.name}"
                for f in dataclasses.fields(cls) if f.name in STEPS[step].wired}
    try:
        cls(**stand_in, **check(step, values))
    except OSError:
        pass
    except (ValueError, TypeError) as err:
        raise UserError(f"parameter {step}: {err}") from err


def step_config(step: str, values: Mapping[str, Any], **wired: Any) -> Any:
    """The step's config in a task: ``values`` over the dataclass defaults, plus the wired fields."""
    if set(wired) != set(STEPS[step].wired):  # a bug in pipelines/components.py, not bad input
        raise TypeError(f"{step}: the component sets {sorted(wired)}, STEPS says "
                        f"{sorted(STEPS[step].wired)}")
    try:
        return config_class(step)(**check(step, values), **wired)
    except UserError:
        raise
    except (ValueError, TypeError) as err:
        raise UserError(f"parameter {step}: {err}") from err


def run_step(step: str, values: Mapping[str, Any], **wired: Any) -> Any:
    """Build the step's config (:func:`step_config`) and run the step on it."""
    return importlib.import_module(STEPS[step].module).run(step_config(step, values, **wired))
