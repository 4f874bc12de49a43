"""Writes that are safe on Cloud Storage FUSE: no folder is ever renamed, a folder is complete only
with its marker, and every file is readable by others (0644)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from components import files


@pytest.fixture
def no_folder_renames(monkeypatch):
    """os.rename / os.replace (which pathlib and shutil.move call) refuse folders, as gcsfuse does
    without rename-dir-limit; file renames go through and are recorded."""
    renamed: list[str] = []

    def guard(real):
        def rename(src, dst, *args, **kwargs):
            if os.path.isdir(src):
                raise AssertionError(f"folder renamed: {src} -> {dst} (not safe on Cloud Storage FUSE)")
            renamed.append(os.fspath(dst))
            return real(src, dst, *args, **kwargs)
        return rename

    monkeypatch.setattr(os, "rename", guard(os.rename))
    monkeypatch.setattr(os, "replace", guard(os.replace))
    return renamed


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_are_readable_by_others(tmp_path):
    previous = os.umask(0o022)  # the usual umask: what a plain open() would give
    try:
        files.write_bytes_atomic(tmp_path / "a.bin", b"x")
        files.write_json_atomic(tmp_path / "b.json", {"k": 1})
    finally:
        os.umask(previous)
    assert mode(tmp_path / "a.bin") == 0o644 and mode(tmp_path / "b.json") == 0o644


def test_atomic_dir_writes_in_place_and_marks_completion_last(tmp_path, no_folder_renames):
    final = tmp_path / "out"
    with files.atomic_dir(final) as folder:
        assert folder == final  # written where it ends up: nothing to rename
        (folder / "sub").mkdir()
        (folder / "sub" / "w.bin").write_bytes(b"1")
        assert not files.is_complete(final)
    assert files.is_complete(final) and mode(final / files.COMPLETE) == 0o644
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*")) == [files.COMPLETE, "sub", "sub/w.bin"]


KILLED_MID_WRITE = """
import os, signal, sys
from components import files
writing = files.atomic_dir(sys.argv[1])
folder = writing.__enter__()
(folder / "half.bin").write_bytes(b"half")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_cut_off_folder_is_incomplete_and_the_next_write_clears_it(tmp_path, no_folder_renames):
    final = tmp_path / "out"
    with files.atomic_dir(final) as folder:
        (folder / "old.bin").write_bytes(b"old")
    # A rewrite killed half-way (SIGKILL: no cleanup runs) leaves the folder without its marker.
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(final)])
    assert killed.returncode == -signal.SIGKILL
    assert (final / "half.bin").is_file() and not (final / "old.bin").exists()
    assert not files.is_complete(final)
    with files.atomic_dir(final) as folder:
        (folder / "new.bin").write_bytes(b"new")
    assert sorted(p.name for p in final.iterdir()) == [files.COMPLETE, "new.bin"]


def test_an_error_removes_the_half_written_folder(tmp_path, no_folder_renames):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), files.atomic_dir(final) as folder:
        (folder / "half.bin").write_bytes(b"half")
        raise RuntimeError("cut off")
    assert not final.exists() and list(tmp_path.iterdir()) == []


def test_the_folder_writing_steps_rename_no_folder(tiny_model_dir, small_pets_dir, tmp_path, no_folder_renames):
    """Each step that writes a folder (stand-in model, synthetic data, prepared data, staged weights,
    fine-tune checkpoints and adapter, merged export) runs with folder renames refused."""
    from components import finetune, merge_export, prepare_dataset, stage_weights, synthetic_pets, tiny_model

    model = tmp_path / "model"
    tiny_model.run(tiny_model.TinyModelConfig(output_dir=str(model)))
    raw = tmp_path / "raw"
    synthetic_pets.run(synthetic_pets.SyntheticPetsConfig(output_dir=str(raw), num_classes=2, images_per_class=4, image_size=32))
    prepare_dataset.run(prepare_dataset.PrepareDatasetConfig(source=str(raw), output_dir=str(tmp_path / "data")))
    stage_weights.run(stage_weights.StageWeightsConfig(source=str(model), destination=str(tmp_path / "staged")))
    adapter = tmp_path / "adapter"
    finetune.run(finetune.FinetuneConfig(
        model_dir=str(tiny_model_dir), dataset_dir=str(small_pets_dir), output_dir=str(adapter),
        checkpoint_dir=str(tmp_path / "ckpt"), lora_r=2, lora_alpha=2, epochs=1, batch_size=4, train_limit=8,
        save_every_steps=1))
    merge_export.run(merge_export.MergeExportConfig(model_dir=str(tiny_model_dir), adapter_dir=str(adapter),
                                                    output_dir=str(tmp_path / "export"), verify_samples=1,
                                                    device="cpu"))
    assert files.is_complete(model) and files.is_complete(raw) and files.is_complete(tmp_path / "export")
    assert no_folder_renames  # the guard saw the steps' file renames, so it was in the path
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert mode(path) & 0o044 == 0o044, f"{path} is not readable by others: {oct(mode(path))}"
