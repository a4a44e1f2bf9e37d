"""Inside a ``ray job submit`` entrypoint the working directory is Ray's temporary copy of
``--working-dir``: a relative ``output_dir`` is refused before anything starts."""

import json
from pathlib import Path

from rlhf.cli import main
from rlhf.config import load_config
from rlhf.run_config import RunConfig
from rlhf.run_sections import ray_job_submission_id

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
# What Ray sets for a job's entrypoint (ray/dashboard/modules/job/job_supervisor.py).
JOB_ENV = json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_abc"}})


def test_relative_output_dir_is_refused_inside_a_ray_job(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert ray_job_submission_id() is None
    assert load_config(RunConfig, QUICKSTART, ["output_dir=runs"]).output_dir == "runs"

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", JOB_ENV)
    assert ray_job_submission_id() == "raysubmit_abc"
    assert main(["finetune", str(QUICKSTART), "output_dir=runs"]) == 2
    err = capsys.readouterr().err
    assert "output_dir='runs' is relative, and this is Ray job raysubmit_abc" in err
    assert "Traceback" not in err
    cfg = load_config(RunConfig, QUICKSTART, [f"output_dir={tmp_path}"])
    assert cfg.output_dir == str(tmp_path)
