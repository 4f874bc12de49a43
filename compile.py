"""Compile the pipeline to a KFP v2 YAML (PipelineSpec) for Vertex AI Pipelines.

    python compile.py --output pipeline.yaml [--preset 31b-qlora|31b-rtx-pro-6000|e4b|e2b|cpu-smoke]
        [--image REF] [--finetune-gpus 1|2|4|8] [--finetune-retries N]

Image, resource preset and the code identity (project version, git commit read here, at compile
time) are baked into the YAML; everything else is a runtime parameter. No secret is read: the
Hugging Face token reaches the stage-weights task at run time from Secret Manager
(``hf_token_secret`` holds the secret's resource name, not its value).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kfp import compiler

from components.cli import UserError, entrypoint

from pipelines.options import DEFAULT_PRESET, IMAGE_ENV, PRESETS, compile_options
from pipelines.pipeline import build_pipeline


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="pipeline.yaml",
                        help="where to write the compiled YAML (default: pipeline.yaml)")
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                        help="accelerator/CPU/memory limits of the tasks. "
                             + " ".join(f"{p.name}: {p.description}" for p in PRESETS.values()))
    parser.add_argument("--image", default=None,
                        help=f"trainer image the tasks run in (default: ${IMAGE_ENV} or the "
                             "Artifact Registry image tagged with the project version)")
    parser.add_argument("--finetune-retries", type=int, default=2,
                        help="retries of the fine-tune task, which resumes from its checkpoints")
    parser.add_argument("--finetune-gpus", type=int, default=None,
                        help="GPUs of the fine-tune task, 1, 2, 4 or 8 as Vertex AI machines carry "
                             "them (default: the preset's); the step runs one data-parallel "
                             "process per GPU")
    return parser.parse_args(argv)


def compile_pipeline(output: str | Path, preset: str = DEFAULT_PRESET, image: str | None = None,
                     finetune_retries: int = 2, finetune_gpus: int | None = None) -> Path:
    try:
        options = compile_options(image=image, preset=preset, finetune_retries=finetune_retries,
                                  finetune_gpus=finetune_gpus)
    except ValueError as err:  # the options' own checks name the flag
        raise UserError(str(err)) from err
    output = Path(output)
    if output.suffix not in (".yaml", ".yml", ".json"):
        raise UserError(f"--output {output}: must end in .yaml, .yml or .json")
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=build_pipeline(options), package_path=str(output))
    return output


@entrypoint
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = compile_pipeline(args.output, args.preset, args.image, args.finetune_retries, args.finetune_gpus)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
