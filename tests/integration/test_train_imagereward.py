"""``kind: imagereward`` as a real 2-worker Ray Train job, registered in a real MLflow store."""

import pytest
import torch
from mlflow import MlflowClient

from rewards.registry import build_reward
from rewards.training import DataConfig, FreezeConfig, OptimConfig
from rlhf.reward_run_config import RewardScalingConfig, RewardTrainConfig
from rlhf.run_sections import CheckpointConfig, MlflowConfig
from rlhf.train_reward import run_job
from tests.unit.test_imagereward import ranked_frame

pytestmark = pytest.mark.integration


def test_imagereward_job_on_ranked_images_registers_a_model(tmp_path, ray_local, mlflow_store):
    ranked_frame(33, bad=(5,)).to_parquet(tmp_path / "train.parquet")
    ranked_frame(8).to_parquet(tmp_path / "eval.parquet")
    cfg = RewardTrainConfig(
        name="imagereward-test",
        kind="imagereward",
        model={"options": {"size": "tiny"}},
        data=DataConfig(
            train=str(tmp_path / "train.parquet"),
            eval=str(tmp_path / "eval.parquet"),
            image_size=32,
        ),
        freeze=FreezeConfig(text_fraction=0.7, vision_fraction=0.7),
        optim=OptimConfig(lr=1e-3, batch_size=8, epochs=1),
        scaling=RewardScalingConfig(num_workers=2),
        checkpoint=CheckpointConfig(keep=1),
        output_dir=str(tmp_path / "runs"),
        mlflow=MlflowConfig(experiment="test"),
        eval_every=2,
    ).validate()
    summary = run_job(cfg)
    # 33 prompts over 2 workers x 8: 2 steps (the corrupt row is skipped, not fatal).
    assert summary["steps"] == 2 and summary["registered_model"] == "imagereward"
    run = MlflowClient().get_run(summary["run_id"])
    assert "eval/pair_acc" in run.data.metrics and "train/pair_acc" in run.data.metrics
    assert run.data.params["freeze.vision_fraction"] == "0.7"
    reward = build_reward({"name": "imagereward", "checkpoint": summary["model_uri"]})
    scores = reward(torch.rand(3, 3, 40, 40), ["a red circle 1"] * 3)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
