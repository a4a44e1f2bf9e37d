"""The command line: errors before anything starts, the console, and the help pages."""

import argparse
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from rlhf import cli, console

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


@pytest.fixture
def restore_console(monkeypatch):
    """``cli.main`` configures this process's logging and warnings; put them back."""
    for k in (console.VERBOSE_ENV, *console._QUIET_ENV):
        monkeypatch.delenv(k, raising=False)
    names = ("", *console.OURS, *console._CHATTY)
    levels = {n: logging.getLogger(n).level for n in names}
    handlers = list(logging.getLogger().handlers)
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)
        logging.getLogger(n).removeFilter(console._ERRORS_ONLY)
    logging.getLogger().handlers[:] = handlers
    logging.captureWarnings(False)


@pytest.fixture
def store(tmp_path, monkeypatch, restore_console):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return uri


def _runs(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def _one_line(err: str) -> str:
    """The stderr lines but tqdm's (a bar redraws with \\r and clears itself) and our
    warnings (skipped rows)."""
    lines = [
        s
        for s in re.split(r"[\r\n]", err)
        if s.strip() and "it/s]" not in s and not s.startswith("WARNING rewards.")
    ]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _corrupt_data(tmp_path: Path, n: int, bad: int) -> Path:
    from rewards.synthetic import write_synthetic_parquet

    path = write_synthetic_parquet(tmp_path / "t.parquet", n, seed=0, image_size=32)
    df = pd.read_parquet(path)
    df.loc[: bad - 1, "easy_image_0"] = b"not an image"
    df.to_parquet(path)
    return path


# --------------------------------------------------------------------------- before anything


@pytest.mark.parametrize(
    "override, key",
    [
        ("rewards=[{name: no_such_module_xyz:make}]", "rewards[0].name"),
        ("rewards=[{name: hp, checkpoint: ./no/such/hp}]", "rewards[0].checkpoint"),
        ("rewards=[{name: hp, checkpoint: models:/nosuch/3}]", "rewards[0].checkpoint"),
        (
            "eval_rewards=[{name: clip, checkpoint: nobody-rlhf-test/none}]",
            "eval_rewards[0].checkpoint",
        ),
        (
            "rewards=[{name: ict_hp, options: {hp: {checkpoint: models:/hp/1}}}]",
            "rewards[0].options.hp.checkpoint",
        ),
        ("prompts.train=empty.txt", "prompts.train"),
    ],
)
def test_finetune_input_errors_fail_before_anything_starts(override, key, tmp_path, store, capsys):
    import ray

    if ray.is_initialized():
        ray.shutdown()  # an earlier test module's Ray: this test checks none is started
    (tmp_path / "empty.txt").write_text("\n  \n")
    import huggingface_hub.constants as hc

    hc.HF_HUB_OFFLINE, offline = True, hc.HF_HUB_OFFLINE
    try:
        rc = cli.main(["finetune", QUICKSTART, f"output_dir={tmp_path / 'runs'}", override])
    finally:
        hc.HF_HUB_OFFLINE = offline
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith(f"error: {key}"), line
    assert not ray.is_initialized()
    assert not (tmp_path / "runs").exists() and _runs(store) == []


def test_finetune_bad_import_path_is_one_line_exit_2_in_seconds(tmp_path):
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "finetune", QUICKSTART, "rewards=[{name: nope_xyz:f}]"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": "sqlite:///m.db"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "rewards[0].name='nope_xyz:f': cannot import module" in _one_line(proc.stderr)
    assert time.perf_counter() - t < 60
    assert not (tmp_path / "runs").exists()


def test_eval_reward_skips_a_whole_corrupt_batch(tmp_path, restore_console, capsys):
    data = _corrupt_data(tmp_path, 4, bad=2)
    args = ["eval-reward", str(data), "--reward", "{name: clip, options: {backbone: tiny}}"]
    assert cli.main([*args, "--batch-size", "2", "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "| clip |" in out and "(2 corrupt or missing triplets skipped)" in out


def test_eval_reward_with_no_readable_triplet_is_one_line(tmp_path, restore_console, capsys):
    data = _corrupt_data(tmp_path, 2, bad=2)
    args = ["eval-reward", str(data), "--reward", "{name: clip, options: {backbone: tiny}}"]
    assert cli.main([*args, "--batch-size", "2", "--image-size", "32"]) == 2
    assert "no readable triplets (2 skipped)" in _one_line(capsys.readouterr().err)


def test_only_our_error_types_become_one_line(restore_console, monkeypatch):
    """A bug (a plain ValueError) keeps its traceback; a user error does not."""

    def boom(args):
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "cmd_rewards_list", boom)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["rewards", "list"])


# --------------------------------------------------------------------------- console


def test_verbose_shows_library_and_row_warnings(tmp_path, restore_console, caplog):
    data = _corrupt_data(tmp_path, 4, bad=1)
    args = ["eval-reward", str(data), "--reward", "{name: clip, options: {backbone: tiny}}"]
    assert cli.main(["-v", *args, "--image-size", "32"]) == 0
    assert "skipping triplet 0" in caplog.text
    logging.getLogger("open_clip").warning("library chatter")
    assert "library chatter" in caplog.text


def test_normal_run_hides_library_chatter_but_not_ours(restore_console, caplog):
    console.setup(False)
    logging.getLogger("open_clip").warning("library chatter")
    logging.warning("root chatter")  # open_clip's "No pretrained weights loaded"
    logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU")
    logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found")
    logging.getLogger("rewards.data").warning("triplet file has 3 bad rows")
    assert "chatter" not in caplog.text and "CUDA" not in caplog.text
    assert "accelerator" not in caplog.text
    assert "triplet file has 3 bad rows" in caplog.text
    # Ray Train sets "ray.train" to INFO in its workers, where each checkpoint is logged
    # ("Checkpoint successfully created at: ...") by a child of it; setup() runs after that.
    logging.getLogger("ray.train").setLevel(logging.INFO)
    console.setup(False)
    storage = logging.getLogger("ray.train.v2._internal.execution.storage")
    assert not storage.isEnabledFor(logging.INFO) and storage.isEnabledFor(logging.ERROR)
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"
    assert console.ray_runtime_env(False)["worker_process_setup_hook"] == "rlhf.console.setup"


def test_mlflow_event_lines_show_with_verbose_only(restore_console, capsys, monkeypatch):
    from mlflow.utils.logging_utils import eprint

    console.setup(False)
    with console.mlflow_events():
        eprint("Registered model 'p' already exists. Creating a new version of this model...")
    assert "already exists" not in capsys.readouterr().err
    eprint("outside")  # the stream is enabled again afterwards
    assert "outside" in capsys.readouterr().err
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    with console.mlflow_events():
        eprint("with -v")
    assert "with -v" in capsys.readouterr().err


# --------------------------------------------------------------------------- help


def _parsers(p: argparse.ArgumentParser, path="rlhf"):
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_argument_and_command_has_help():
    for path, p in _parsers(cli.build_parser()):
        assert p.description, f"{path}: no description"
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for choice in a._choices_actions:
                    assert choice.help, f"{path} {choice.dest}: no help"
            else:
                assert a.help and a.help != argparse.SUPPRESS, (
                    f"{path} {a.option_strings or a.dest}"
                )


def test_top_level_help_reads_as_a_users_page(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for word in ("commands:", "examples:", "finetune --resume", "MLFLOW_TRACKING_URI", "-v"):
        assert word in out, word
    assert "parses, validates" not in out  # not the module docstring
