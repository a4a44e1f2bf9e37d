from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.config import ConfigError, flatten, load_config, parse_overrides
from rlhf.reward_run_config import RewardTrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("reward_*.yaml")), ids=lambda p: p.name)
def test_reward_configs_load_and_start_with_a_comment(path):
    assert path.read_text().startswith("#")
    cfg = load_config(RewardTrainConfig, path)
    assert cfg.kind in ("ict", "hp", "imagereward")
    assert cfg.checkpoint.every % cfg.eval_every == 0


def test_overrides_parse_yaml_values():
    out = parse_overrides(
        ["optim.lr=3.0e-4", "scaling.num_workers=4", "model={options: {backbone: tiny}}"]
    )
    assert out == {
        "optim": {"lr": 3e-4},
        "scaling": {"num_workers": 4},
        "model": {"options": {"backbone": "tiny"}},
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.lr"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("optim.lr=fast", "optim.lr"),
        ("scaling.num_workers=0", "scaling.num_workers"),
        ("kind=vae", "kind"),
        ("data.train=/no/such.parquet", "data.train"),
        ("model={name: x}", "model"),
        ("scaling.use_gpu=maybe", "scaling.use_gpu"),
        ("scaling.strategy=fsdp", "scaling.strategy"),
        ("scaling.zero_stage=4", "scaling.zero_stage"),
        ("scaling.cpus_per_worker=-1", "scaling.cpus_per_worker"),
        ("scaling.max_failures=-2", "scaling.max_failures"),
        ("checkpoint.keep=0", "checkpoint.keep"),
        ("checkpoint.every=40", "checkpoint.every"),  # not a multiple of eval_every=32
        ("name=a/b", "name"),
        ("labels.source=teacher", "labels.teacher"),
        ("loss.icthp_weight=1.0", "ict_model"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(RewardTrainConfig, CONFIGS / "reward_hp.yaml", [override])


def test_unknown_reward_kind_in_model_spec():
    with pytest.raises(ConfigError, match="kind"):
        load_config(RewardTrainConfig, None, ["kind=no_such_kind"])


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [ict\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(RewardTrainConfig, bad)


def test_exponent_without_dot_is_a_float():
    cfg = load_config(RewardTrainConfig, CONFIGS / "reward_ict.yaml", ["optim.lr=3e-4"])
    assert cfg.optim.lr == 3e-4


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": {}}) == {"a.b": 1, "a.c.d": 2, "e": {}}


def test_cli_bad_config_exits_nonzero_before_ray_starts(tmp_path, capsys, monkeypatch):
    import ray

    def no_ray(
        *args, **kwargs
    ):  # other tests may share a Ray session; a bad config must not touch it
        raise AssertionError("ray.init called for a bad config")

    monkeypatch.setattr(ray, "init", no_ray)
    rc = main(["train-reward", str(CONFIGS / "reward_ict.yaml"), "scaling.num_workers=0"])
    assert rc == 2
    assert "scaling.num_workers" in capsys.readouterr().err
    rc = main(["train-reward", str(CONFIGS / "reward_ict.yaml"), "data.train=/missing.parquet"])
    assert rc == 2
    assert "data.train" in capsys.readouterr().err


def test_cli_rewards_list(capsys):
    assert main(["rewards", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("ict", "hp", "ict_hp", "pickscore", "hpsv2", "aesthetic"):
        assert name in out
