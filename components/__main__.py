"""``gemma-pets <command> [flags]``: the one entrypoint of the container and the Cloud Run Job.

Each command is a step module's ``main(argv)``; ``gemma-pets <command> --help`` lists its flags.
Bad input ends with one ``error: ...`` line and exit status 2; ``--debug`` (anywhere) or
``GEMMA_PETS_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

from components.cli import DEBUG_ENV

COMMANDS = {
    "stage-weights": "components.stage_weights",
    "prepare-dataset": "components.prepare_dataset",
    "finetune": "components.finetune",
    "evaluate": "components.evaluate",
    "merge-export": "components.merge_export",
    "resolve-source": "components.sources",
    "tiny-model": "components.tiny_model",
    "random-model": "components.random_model",
    "synthetic-pets": "components.synthetic_pets",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # also before the command: `gemma-pets --debug finetune ...`
        argv.remove("--debug")
        os.environ[DEBUG_ENV] = "1"
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        known = ", ".join(COMMANDS)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown command {argv[0]!r}; known commands: {known}", file=sys.stderr)
            return 2
        print(f"usage: gemma-pets <command> [flags]\ncommands: {known}")
        return 0
    module = importlib.import_module(COMMANDS[argv[0]])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
