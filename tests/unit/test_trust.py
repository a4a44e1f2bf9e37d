"""A checkpoint never chooses code; checkpoint references resolve to what they say they are."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rewards.checkpoint_refs import is_hub_id
from rewards.errors import MissingPathError, UntrustedCheckpointError
from rewards.registry import RewardSpec, build_reward, check_reward

ROOT = Path(__file__).resolve().parents[2]


def _code_folder(tmp_path: Path, marker: Path, name="subprocess:getoutput") -> Path:
    """The issue's folder: a reward.json that names a function running a shell command."""
    folder = tmp_path / "evil"
    folder.mkdir()
    meta = {"format": 1, "name": name, "options": {"cmd": f"touch {marker}"}}
    (folder / "reward.json").write_text(json.dumps(meta))
    return folder


def _rlhf(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "rlhf.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_eval_reward_refuses_a_checkpoint_that_names_code(tmp_path):
    from rewards.synthetic import write_synthetic_parquet

    marker = tmp_path / "MARKER"
    folder = _code_folder(tmp_path, marker)
    data = write_synthetic_parquet(tmp_path / "t.parquet", 4, seed=0, image_size=32)
    proc = _rlhf(
        "eval-reward", str(data), "--reward", f"{{name: hp, checkpoint: {folder}}}", cwd=tmp_path
    )
    assert not marker.exists(), "the checkpoint's command ran"
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "subprocess:getoutput" in err[0] and "may not choose which code runs" in err[0]


def test_models_uri_checkpoint_that_names_code_is_refused(tmp_path, monkeypatch):
    """The same folder registered in a (shared) MLflow registry: refused the same way."""
    import mlflow

    from rlhf import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.setup(None, "trust")
    marker = tmp_path / "MARKER"
    folder = _code_folder(tmp_path, marker)
    with mlflow.start_run() as run:
        version = tracking.register_folder(folder, "evil", run.info.run_id)
    with pytest.raises(UntrustedCheckpointError, match="subprocess:getoutput"):
        build_reward({"name": "hp", "checkpoint": f"models:/evil/{version}"})
    assert not marker.exists()


def test_nested_ict_hp_options_cannot_pick_code(tmp_path):
    marker = tmp_path / "MARKER"
    folder = tmp_path / "icthp"
    folder.mkdir()
    sub = {"name": "subprocess:getoutput", "options": {"cmd": f"touch {marker}"}}
    meta = {"format": 1, "name": "ict_hp", "options": {"ict": sub, "hp": {}}}
    (folder / "reward.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="options.ict.name"):
        build_reward({"name": "hp", "checkpoint": str(folder)})
    assert not marker.exists()


def test_a_checkpoint_may_name_the_import_path_the_user_named(tmp_path):
    """The rule lets the user's own plug-in load its own saved checkpoints."""
    marker = tmp_path / "MARKER"
    folder = _code_folder(tmp_path, marker)
    with pytest.raises(Exception):  # noqa: B017 - getoutput's str is no reward; it did run
        build_reward({"name": "subprocess:getoutput", "checkpoint": str(folder)})
    assert marker.exists()


def test_missing_relative_path_is_a_missing_path_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts").mkdir()
    for ref in ("ckpts/hp", "./nowhere/hp", "nowhere/hp.safetensors"):
        assert not is_hub_id(ref)
        with pytest.raises(MissingPathError) as e:
            build_reward({"name": "hp", "checkpoint": ref}, "rewards[0]")
        msg = str(e.value)
        assert "rewards[0].checkpoint" in msg and "no such file or folder" in msg
        assert "hub" not in msg
    assert is_hub_id("8y/HP") and is_hub_id("xswu/HPSv2")


def test_unreachable_hub_id_names_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    spec = {"name": "hp", "checkpoint": "nobody-rlhf-test/no-such-repo"}
    with pytest.raises(MissingPathError, match=r"rewards\[1\]\.checkpoint='nobody-rlhf-test"):
        build_reward(spec, "rewards[1]")
    with pytest.raises(MissingPathError, match=r"rewards\[1\]\.checkpoint"):
        check_reward(RewardSpec.from_dict(spec), "rewards[1]")


def test_finetune_refuses_a_checkpoint_that_names_code_before_anything_starts(tmp_path):
    """The issue's folder as a fine-tuning reward: one line, exit 2, before Ray or a run."""
    marker = tmp_path / "MARKER"
    folder = _code_folder(tmp_path, marker)
    config = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    proc = _rlhf(
        "finetune",
        str(config),
        f"output_dir={tmp_path / 'runs'}",
        f"rewards=[{{name: hp, checkpoint: {folder}}}]",
        cwd=tmp_path,
    )
    assert not marker.exists(), "the checkpoint's command ran"
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert "may not choose which code runs" in err[-1] and "Traceback" not in proc.stderr
    assert "starting a local Ray" not in proc.stdout and not (tmp_path / "runs").exists()
