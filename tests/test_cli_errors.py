"""Bad input on every step CLI ends with one ``error: ...`` line on stderr, exit status 2 and no
traceback, before any model is loaded (components.cli.entrypoint).

``CASES`` is the one list of cases and their exact messages; it is also the table in
docs/bad-input.md (``python -m tests.test_cli_errors`` rewrites it, and a test checks that it
matches). Each case runs in a fresh working folder, so the paths in the messages are the
relative ones given on the command line. Cases run in-process (``main(argv)``: an import costs
3-5 s here); a few real subprocess runs show the same from a shell.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from components import prepare_dataset, synthetic_pets
from components.cli import DEBUG_ENV
from pipelines import options as pipeline_options
from tests.helpers import REPO

DOCS = REPO / "docs" / "bad-input.md"
UNREACHABLE_HUB = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused

MAINS = {
    "stage-weights": "components.stage_weights", "prepare-dataset": "components.prepare_dataset",
    "finetune": "components.finetune", "evaluate": "components.evaluate",
    "merge-export": "components.merge_export", "local run": "pipelines.local_run",
    "submit": "pipelines.submit", "compile": "compile",
}


# ---- inputs the cases start from, made in the case's working folder --------------------------


def pets(root: Path = Path("pets")) -> Path:
    """3 classes x 4 images, official layout (list.txt line 7 is the first image)."""
    synthetic_pets.run(synthetic_pets.SyntheticPetsConfig(output_dir=str(root), num_classes=3, images_per_class=4,
                                             image_size=32, seed=0))
    return root


def pets_without_images() -> None:
    shutil.rmtree(pets() / "images")


def pets_with_empty_images() -> None:
    shutil.rmtree(pets() / "images")
    Path("pets/images").mkdir()


def pets_with_a_bad_line() -> None:
    path = pets() / "annotations" / "list.txt"
    lines = path.read_text().splitlines()
    lines[8] = lines[8].rsplit(" ", 1)[0]  # line 9 loses its BREED ID column
    path.write_text("\n".join(lines) + "\n")


def prepared() -> None:
    prepare_dataset.run(prepare_dataset.PrepareDatasetConfig(source=str(pets()), output_dir="out"))


def one_class() -> None:
    Path("one-class/cat").mkdir(parents=True)
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        Image.new("RGB", (16, 16), "red").save(Path("one-class/cat") / name)


def empty_folder() -> None:
    Path("empty").mkdir()


def a_file() -> None:
    pets()
    Path("out").write_text("not a folder")


def a_template() -> None:
    import compile as compile_cli

    compile_cli.compile_pipeline("pipeline.yaml", image="us-central1-docker.pkg.dev/acme/gp/trainer:1")
    Path("params.yaml").write_text("weights_source: gs://acme/models/g\ndataset_source: gs://acme/pets\n")


def model_and_dataset() -> None:
    """What the model-side steps check before loading anything: a config.json and a manifest."""
    Path("model").mkdir()
    Path("model/config.json").write_text("{}")
    Path("data").mkdir()
    Path("data/manifest.json").write_text(
        '{"class_names": ["cat", "dog"], "splits": {"train": {"num_examples": 2, "shards": []},'
        ' "eval": {"num_examples": 2, "shards": [{"file": "eval.parquet"}]}}}')
    Path("adapter").mkdir()
    Path("adapter/adapter_config.json").write_text('{"peft_type": "LORA"}')
    save_file({"layer.lora_A.weight": np.zeros((1, 1), np.float32)}, "adapter/adapter_model.safetensors")
    Path("metrics.json").write_text("{not json")


def an_empty_adapter_file() -> None:
    model_and_dataset()
    Path("adapter/adapter_model.safetensors").write_bytes(b"")


@dataclass
class Case:
    step: str
    what: str
    argv: list[str]
    message: str  # the exact stderr line after "error: " (argparse: after "<prog>: error: ")
    setup: Callable[[], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    issue_row: bool = False  # one of the rows of issue 15

    @property
    def by_argparse(self) -> bool:
        return self.message.startswith(("the following arguments are required", "argument "))


HUB_ENV = {"HF_ENDPOINT": UNREACHABLE_HUB, "HF_HUB_OFFLINE": "0"}
PD = ["--output-dir", "out"]

CASES = [
    # ---- prepare-dataset: the rows of issue 15 -------------------------------------------------
    Case("prepare-dataset", "--source that does not exist", ["--source", "nope", *PD],
         "--source nope: no such folder; check the path (a Hugging Face dataset id has the form owner/name)",
         issue_row=True),
    Case("prepare-dataset", "a mistyped path (never sent to the Hub: starts with '.', or has two '/')",
         ["--source", "./data/oxford-pets", *PD],
         "--source ./data/oxford-pets: no such folder; check the path (a Hugging Face dataset id has the form owner/name)",
         env=HUB_ENV, issue_row=True),
    Case("prepare-dataset", "a mistyped path with a trailing '/'", ["--source", "data/oxford-pets/", *PD],
         "--source data/oxford-pets/: no such folder; check the path (a Hugging Face dataset id has the form owner/name)",
         env=HUB_ENV, issue_row=True),
    Case("prepare-dataset", "owner/name that is no local folder, Hub unreachable (said on stderr first)",
         ["--source", "data/oxford-pets", *PD],
         "--source data/oxford-pets: no such local folder, and the Hugging Face Hub could not serve it "
         "(offline? ConnectError: [Errno 111] Connection refused)", env=HUB_ENV, issue_row=True),
    Case("prepare-dataset", "owner/name that is no local folder, HF_HUB_OFFLINE=1 and not cached",
         ["--source", "data/oxford-pets", *PD],
         "--source data/oxford-pets: no such local folder, and the Hugging Face Hub could not serve it: "
         "HF_HUB_OFFLINE is set and the datasets cache does not hold it", env={"HF_HUB_OFFLINE": "1"},
         issue_row=True),
    Case("prepare-dataset", "an empty folder", ["--source", "empty", *PD],
         "--source empty: the folder is empty; expected the official layout (images/ + annotations/, or "
         "images.tar.gz + annotations.tar.gz), one sub-folder per class, or a Hugging Face dataset folder",
         setup=empty_folder, issue_row=True),
    Case("prepare-dataset", "annotations but no images/", ["--source", "pets", *PD],
         "--source pets: no images/ folder next to annotations/ (official layout: images/ + "
         "annotations/); extract images.tar.gz there",
         setup=pets_without_images, issue_row=True),
    Case("prepare-dataset", "annotations with an empty images/ folder", ["--source", "pets", *PD],
         "pets/images: none of the 12 images listed in pets/annotations/list.txt is there (e.g. "
         "images/Abyssinian_1.jpg); put the images there (extract images.tar.gz into it)",
         setup=pets_with_empty_images, issue_row=True),
    Case("prepare-dataset", "a malformed list.txt line", ["--source", "pets", *PD],
         "pets/annotations/list.txt:9: expected 4 columns 'Image CLASS-ID SPECIES BREED-ID', got "
         "'Abyssinian_3 1 1'", setup=pets_with_a_bad_line, issue_row=True),
    Case("prepare-dataset", "a second run into a prepared folder with other options",
         ["--source", "pets", *PD, "--num-classes", "2"],
         "--output-dir out already holds a dataset prepared with other options (--num-classes None -> 2); "
         "pass --overwrite to replace it, or choose another --output-dir", setup=prepared, issue_row=True),
    Case("prepare-dataset", "a one-class source", ["--source", "one-class", *PD],
         "--source one-class has 1 class(es) ['cat']; at least 2 are needed (with one class every answer "
         "is right: accuracy would be a trivial 100%)", setup=one_class, issue_row=True),
    Case("prepare-dataset", "one class kept by a flag", ["--source", "pets", *PD, "--num-classes", "1"],
         "--num-classes 1: keep at least 2 classes (with one class every answer is right: accuracy would "
         "be a trivial 100%)", issue_row=True),
    # ---- prepare-dataset: flags ----------------------------------------------------------------
    Case("prepare-dataset", "a value out of range", ["--source", "pets", *PD, "--eval-fraction", "1.5"],
         "--eval-fraction must be in (0, 1), got 1.5"),
    Case("prepare-dataset", "--output-dir is a file", ["--source", "pets", *PD],
         "--output-dir out is a file, not a folder", setup=a_file),
    Case("prepare-dataset", "a required flag missing", ["--source", "pets"],
         "the following arguments are required: --output-dir"),
    # ---- stage-weights -------------------------------------------------------------------------
    Case("stage-weights", "--source folder that does not exist", ["--source", "./nope", "--destination", "w"],
         "--source ./nope: folder does not exist"),
    Case("stage-weights", "a path with two '/' (never sent to the Hub)",
         ["--source", "models/gemma/e2b", "--destination", "w"], "--source models/gemma/e2b: folder does not exist"),
    Case("stage-weights", "owner/name that is no local folder, Hub unreachable (said on stderr first)",
         ["--source", "google/gemma-4-e2b-it", "--destination", "w"],
         "--source google/gemma-4-e2b-it: no such local folder, and the Hugging Face Hub at "
         f"{UNREACHABLE_HUB} could not serve it (cannot reach the Hub, offline?): ConnectError: "
         "[Errno 111] Connection refused", env=HUB_ENV),
    Case("stage-weights", "a value out of range", ["--source", "model", "--destination", "w", "--max-workers", "0"],
         "--max-workers must be >= 1, got 0", setup=model_and_dataset),
    Case("stage-weights", "a required flag missing", ["--source", "model"],
         "the following arguments are required: --destination"),
    # ---- finetune ------------------------------------------------------------------------------
    Case("finetune", "--model-dir without config.json", ["--model-dir", "nope", "--dataset-dir", "data",
                                                         "--output-dir", "a"],
         "--model-dir nope: no config.json there (not a model folder)", setup=model_and_dataset),
    Case("finetune", "--dataset-dir not prepared", ["--model-dir", "model", "--dataset-dir", "nope",
                                                    "--output-dir", "a"],
         "nope/manifest.json not found: nope is not a complete prepared dataset (prepare-dataset writes "
         "manifest.json last; run it again to finish the folder)", setup=model_and_dataset),
    Case("finetune", "4-bit without a GPU", ["--model-dir", "model", "--dataset-dir", "data", "--output-dir",
                                             "a", "--quantization", "nf4", "--device", "cpu"],
         "--quantization nf4 needs a CUDA GPU (bitsandbytes 4-bit); use --quantization none on CPU",
         setup=model_and_dataset),
    Case("finetune", "a value out of range", ["--model-dir", "model", "--dataset-dir", "data",
                                              "--output-dir", "a", "--micro-batch-size", "5"],
         "--micro-batch-size 5 must divide --batch-size 16 (or be 0 for the memory preset's)"),
    Case("finetune", "a choice that does not exist", ["--model-dir", "m", "--dataset-dir", "d", "--output-dir",
                                                      "a", "--memory-preset", "huge"],
         "argument --memory-preset: invalid choice: 'huge' (choose from 'auto', 'fast', '40gb', '24gb')"),
    # ---- evaluate ------------------------------------------------------------------------------
    Case("evaluate", "--adapter-dir that is no adapter", ["--model-dir", "model", "--dataset-dir", "data",
                                                          "--output-dir", "e", "--adapter-dir", "model"],
         "--adapter-dir model: no adapter_config.json there (not a LoRA adapter folder)", setup=model_and_dataset),
    Case("evaluate", "--model-dir without config.json", ["--model-dir", "data", "--dataset-dir", "data",
                                                         "--output-dir", "e"],
         "--model-dir data: no config.json there (not a model folder)", setup=model_and_dataset),
    Case("evaluate", "a value out of range", ["--model-dir", "model", "--dataset-dir", "data", "--output-dir",
                                              "e", "--batch-size", "-1"],
         "--batch-size must be positive (or 0 for the GPU's default), got -1"),
    # ---- merge-export --------------------------------------------------------------------------
    Case("merge-export", "--adapter-dir that does not exist", ["--model-dir", "model", "--adapter-dir", "nope",
                                                               "--output-dir", "x"],
         "--adapter-dir nope: folder not found", setup=model_and_dataset),
    Case("merge-export", "--metrics-path that is not JSON", ["--model-dir", "model", "--adapter-dir", "adapter",
                                                             "--output-dir", "x", "--metrics-path", "metrics.json"],
         "--metrics-path metrics.json: not valid JSON (Expecting property name enclosed in double quotes: "
         "line 1 column 2 (char 1))", setup=model_and_dataset),
    Case("merge-export", "an adapter file that is not safetensors", ["--model-dir", "model", "--adapter-dir",
                                                                      "adapter", "--output-dir", "x"],
         "--adapter-dir adapter: adapter_model.safetensors is not a readable safetensors file (Error while "
         "deserializing header: header too small)", setup=an_empty_adapter_file),
    Case("merge-export", "a malformed value", ["--model-dir", "model", "--adapter-dir", "adapter",
                                               "--output-dir", "x", "--max-shard-size", "big"],
         "--max-shard-size must look like 5GB, 500MB or a byte count, got 'big'", setup=model_and_dataset),
    # ---- the pipeline's local run, submit, compile ---------------------------------------------
    Case("local run", "--dataset-source path that does not exist", ["--run-dir", "r", "--dataset-source",
                                                                     "./data/pets"],
         "--dataset-source ./data/pets: no such file or folder (a Hugging Face id has the form owner/name)"),
    Case("local run", "one synthetic class", ["--run-dir", "r", "--num-classes", "1"],
         "--num-classes must be >= 2, got 1"),
    Case("local run", "a step parameter of the wrong type", ["--run-dir", "r", "--param", "finetune.epochs=two"],
         "parameter finetune.epochs='two': expected int"),
    Case("local run", "a step parameter the step does not have", ["--run-dir", "r", "--param", "gate.margn=0.1"],
         "parameter gate.margn: gate has no key 'margn'; its keys: margin, min_accuracy, export_tolerance"),
    Case("submit", "--template that does not exist", ["--template", "nope.yaml", "--project", "p", "--region",
                                                      "us-central1", "--pipeline-root", "gs://b/root"],
         "--template nope.yaml: no such file (run `make compile` first)"),
    Case("submit", "no Google Cloud credentials", ["--template", "pipeline.yaml", "--project", "p", "--region",
                                                   "us-central1", "--pipeline-root", "gs://b/root",
                                                   "--parameters", "params.yaml"],
         "no Google Cloud credentials (File nope.json was not found.); run `gcloud auth application-default "
         "login`, or set GOOGLE_APPLICATION_CREDENTIALS to a key file", setup=a_template,
         env={"GOOGLE_APPLICATION_CREDENTIALS": "nope.json"}),
    Case("submit", "a required flag missing", ["--template", "nope.yaml"],
         "the following arguments are required: --project, --region, --pipeline-root"),
    Case("compile", "--output with another suffix", ["--output", "p.txt"],
         "--output p.txt: must end in .yaml, .yml or .json"),
    Case("compile", "a choice that does not exist", ["--preset", "70b"],
         "argument --preset: invalid choice: '70b' (choose from "
         + ", ".join(repr(name) for name in sorted(pipeline_options.PRESETS)) + ")"),
]


def run_case(case: Case, monkeypatch, capsys) -> tuple[int, str, float]:
    """(exit status, stderr, seconds) of ``case`` run in-process in the current folder."""
    import huggingface_hub.constants

    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    if "HF_HUB_OFFLINE" in case.env:  # read once at import by huggingface_hub
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", case.env["HF_HUB_OFFLINE"] == "1")
    if case.setup:
        case.setup()
    capsys.readouterr()
    main = importlib.import_module(MAINS[case.step]).main
    start = time.perf_counter()
    try:
        code = main(list(case.argv))
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capsys.readouterr().err, time.perf_counter() - start


@pytest.mark.parametrize("case", CASES, ids=[f"{c.step}: {c.what}" for c in CASES])
def test_bad_input_is_one_line_exit_2_no_traceback(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err, seconds = run_case(case, monkeypatch, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1, err
    if case.by_argparse:
        assert errors[0].endswith(f": error: {case.message}"), err
    else:
        assert errors[0] == f"error: {case.message}", err
        assert err.rstrip("\n").endswith(errors[0])  # the last thing said
    assert seconds < 20  # no model loading, no Hub retries (~25 s); imports are slow on a busy 2-core VM
    assert not Path("out/manifest.json").exists() or case.setup is prepared


def test_hub_sources_are_announced_and_fail_within_seconds(tmp_path, monkeypatch, capsys):
    (case,) = [c for c in CASES if c.what.startswith("owner/name") and "unreachable" in c.what
               and c.step == "prepare-dataset"]
    monkeypatch.chdir(tmp_path)
    code, err, seconds = run_case(case, monkeypatch, capsys)
    assert err.splitlines()[0] == ("--source data/oxford-pets is not a local folder: loading the Hugging "
                                   f"Face dataset data/oxford-pets from {UNREACHABLE_HUB}")
    assert code == 2 and seconds < 3  # the datasets library alone retried for ~25 s


@pytest.fixture
def hub_without_the_dataset(monkeypatch):
    """A Hub that answers every request with 404 RepoNotFound (a missing or private dataset)."""
    import http.server
    import threading

    import huggingface_hub.constants

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "Repository not found"}')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield
    server.shutdown()
    server.server_close()


def test_hub_without_the_dataset_says_so(hub_without_the_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert prepare_dataset.main(["--source", "someone/private-pets", "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: --source someone/private-pets: no such local folder, and the Hugging Face Hub could not "
        "serve it: no such dataset, or no access; set HF_TOKEN for a private or gated one")


def test_paths_are_never_sent_to_the_hub(tmp_path, monkeypatch, capsys):
    """No stderr line saying the Hub is asked, for every path-shaped source."""
    monkeypatch.chdir(tmp_path)
    for case in CASES:
        if case.step in ("prepare-dataset", "stage-weights") and "never sent" in case.what:
            code, err, _ = run_case(case, monkeypatch, capsys)
            assert code == 2 and "Hugging Face Hub at" not in err and "loading the Hugging" not in err


@pytest.mark.parametrize("step", ["finetune", "evaluate", "merge-export"])
def test_device_flag_is_checked_before_loading(step, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.chdir(tmp_path)
    model_and_dataset()
    inputs = {"finetune": ["--dataset-dir", "data"], "evaluate": ["--dataset-dir", "data"],
              "merge-export": ["--adapter-dir", "adapter"]}[step]
    main = importlib.import_module(MAINS[step]).main
    assert main(["--model-dir", "model", *inputs, "--output-dir", "o", "--device", "banana"]) == 2
    assert capsys.readouterr().err.startswith("error: --device 'banana' is not a device torch knows (")
    if not torch.cuda.is_available():
        assert main(["--model-dir", "model", *inputs, "--output-dir", "o", "--device", "cuda"]) == 2
        assert capsys.readouterr().err == ("error: --device cuda: CUDA is not available on this machine; "
                                           "use --device cpu\n")


# ---- real processes -----------------------------------------------------------------------------


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **env}
    full_env.pop(DEBUG_ENV, None)
    full_env.update(env)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args,message", [
    (["-m", "components", "prepare-dataset", "--source", "nope", "--output-dir", "out"],
     "error: --source nope: no such folder"),
    (["-m", "components", "finetune", "--model-dir", "nope", "--dataset-dir", "d", "--output-dir", "a"],
     "error: --model-dir nope: no config.json there"),
    ([str(REPO / "compile.py"), "--output", "p.txt"], "error: --output p.txt: must end in .yaml"),
    (["-m", "pipelines.local_run", "--run-dir", "r", "--num-classes", "1"], "error: --num-classes must be >= 2"),
])
def test_from_a_shell(tmp_path, args, message):
    result = _run(args, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr


def test_debug_shows_the_traceback(tmp_path):
    args = ["-m", "components", "prepare-dataset", "--source", "nope", "--output-dir", "out"]
    for result in (_run(args, tmp_path, **{DEBUG_ENV: "1"}), _run([*args, "--debug"], tmp_path),
                   _run([*args[:2], "--debug", *args[2:]], tmp_path)):
        assert result.returncode == 1 and "Traceback" in result.stderr
        assert "components.cli.UserError: --source nope: no such folder" in result.stderr


# ---- docs/bad-input.md ---------------------------------------------------------------------------


def render() -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "# Bad input: what each command says",
        "",
        "Generated from `tests/test_cli_errors.py` (`python -m tests.test_cli_errors` rewrites this",
        "file; a test fails when it no longer matches). Every case below ends with exactly this line on",
        "stderr, `error: ` first, exit status 2, no traceback, before any model is loaded. Paths are",
        "as given on the command line, relative to the working folder the test sets up. Flags that",
        "argparse refuses (unknown choice, missing flag) print its usage line first; their line reads",
        "`<program>: error: ...`. For a traceback, add `--debug` or set `GEMMA_PETS_DEBUG=1`.",
        "",
        "An `owner/name` source that is no local folder is announced on stderr before the Hub is",
        "asked (`--source X is not a local folder: loading the Hugging Face dataset X from URL`);",
        "anything starting with `.`, `/` or `~`, or with more than one `/`, is never sent to the Hub.",
        "Rows marked * are the cases of issue 15. Its other rows are behaviour, tested in",
        "tests/test_prepare_dataset.py: a rerun with the same options is a no-op; `--overwrite`",
        "replaces a dataset; an interrupted run's temporary files are removed by the next run; an",
        "image in list.txt but in neither split file is listed with the skipped files (reason",
        "`listed in list.txt but in neither trainval.txt nor test.txt`); written files are 0644.",
        "",
        "| command | bad input | message (stderr) |",
        "|---|---|---|",
    ]
    for case in CASES:
        env = " ".join(f"{k}={v}" for k, v in case.env.items())
        what = f"{case.what}{' *' if case.issue_row else ''}: `{' '.join(case.argv)}`" + (f" ({env})" if env else "")
        prefix = "<program>: error: " if case.by_argparse else "error: "
        lines.append(f"| {case.step} | {cell(what)} | `` {cell(prefix + case.message)} `` |")  # `` : may hold `
    return "\n".join(lines) + "\n"


def test_docs_table_matches_the_cases():
    assert DOCS.read_text() == render(), "run: python -m tests.test_cli_errors"


if __name__ == "__main__":
    DOCS.write_text(render())
    print(f"wrote {DOCS}")
