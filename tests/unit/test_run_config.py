"""The run schemas: every shipped config loads; bad input names its key and exits non-zero
before Ray starts; a renamed key names its new place."""

from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.config import ConfigError, load_config
from rlhf.prompts import read_prompts, step_batch
from rlhf.reward_run_config import RewardTrainConfig
from rlhf.run_config import RunConfig
from tests.unit.test_cli import restore_console  # noqa: F401 (a fixture)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cls = RewardTrainConfig if path.name.startswith("reward_") else RunConfig
    cfg = load_config(cls, path)
    assert cfg is not None


def test_paper_config_is_the_paper_setting():
    cfg = load_config(RunConfig, CONFIGS / "sd35_large_turbo_ict_hp.yaml")
    p = cfg.policy
    assert p.generator.model == "stabilityai/stable-diffusion-3.5-large-turbo"
    assert (p.sampler.steps, p.sampler.guidance_scale, p.draft.k) == (4, 0.0, 1)
    assert p.finetune.mode == "lora"
    assert {s.name for s in cfg.reward_specs()} == {"ict", "hp"}


@pytest.mark.parametrize(
    "override, key",
    [
        ("policy.draft.k=5", "policy.draft.k"),  # K > steps
        ("rewards=[{name: nope}]", "rewards[0].name"),
        ("rewards=[{name: hp, weight: -1}]", "rewards[0].weight"),
        ("rewards=[{name: hp, placement: moon}]", "rewards[0].placement"),
        ("rewards=[]", "rewards"),
        ("scaling.num_workers=0", "scaling.num_workers"),
        ("scaling.gpus_per_worker=1", "scaling.gpus_per_worker=1.0 needs scaling.use_gpu=true"),
        ("scaling.resources_per_worker={CPU: 2}", "scaling.cpus_per_worker"),
        ("scaling.max_failures=-2", "scaling.max_failures"),
        ("checkpoint.keep=0", "checkpoint.keep"),
        ("checkpoint.every=0", "checkpoint.every"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.max_steps=0", "train.max_steps"),
        ("prompts.train=/missing.txt", "prompts.train"),
        ("policy.generator.attention=flash9", "policy.generator.attention"),
        ("policy.sampler.height=30", "policy.sampler.height"),
        ("reward_server.max_batch_size=0", "reward_server.max_batch_size"),
        ("text_encoder.resources.num_gpus=-1", "text_encoder.resources.num_gpus"),
        ("train.bogus=1", "train.bogus"),
        ("policy.draft.mode=reinforce", "policy.draft.mode"),
        ("policy.draft.refl_steps=[2, 4]", "policy.draft.refl_steps"),  # hi >= steps
        ("policy.draft.refl_steps=[3]", "policy.draft.refl_steps"),
        ("policy.draft.refl_loss=abs", "policy.draft.refl_loss"),
        ("policy.draft.refl_scale=0", "policy.draft.refl_scale"),
        ("policy.draft.refl_steps=late", "policy.draft.refl_steps"),
        ("rewards=[{name: hp}, {name: hp}]", "rewards: duplicate"),  # two need a 'label'
    ],
)
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(RunConfig, QUICKSTART, [override])


# Old keys fail loudly with the new place, never silently ignored (both schemas, same words).
RENAMED = [
    (RunConfig, QUICKSTART, "workers.num_workers=2", "scaling.num_workers"),
    (RunConfig, QUICKSTART, "workers.batch_size=2", "train.batch_size"),
    (RunConfig, QUICKSTART, "workers.resources.num_cpus=1", "scaling.cpus_per_worker"),
    (RunConfig, QUICKSTART, "workers.resources.max_restarts=0", "scaling.max_failures"),
    (RunConfig, QUICKSTART, "workers.max_rebuilds=0", "scaling.max_failures"),
    (RunConfig, QUICKSTART, "workers.text_encoder.num_cpus=0", "text_encoder.resources"),
    (RunConfig, QUICKSTART, "train.keep_checkpoints=3", "checkpoint.keep"),
    (RunConfig, QUICKSTART, "train.checkpoint_every=5", "checkpoint.every"),
    (RewardTrainConfig, CONFIGS / "reward_ict.yaml", "checkpoint.storage_path=/x", "output_dir"),
]


@pytest.mark.parametrize("cls, path, override, new", RENAMED, ids=lambda x: str(x)[:40])
def test_a_renamed_key_names_its_new_place(cls, path, override, new):
    with pytest.raises(ConfigError, match=f"renamed, use {new}") as e:
        load_config(cls, path, [override])
    assert override.startswith(str(e.value).split(": renamed")[0])  # names the old key


@pytest.mark.usefixtures("restore_console")
def test_cli_refuses_an_old_key_with_exit_2_before_ray(capsys, monkeypatch):
    import ray

    def no_ray(*a, **k):
        raise AssertionError("ray.init called for a bad config")

    monkeypatch.setattr(ray, "init", no_ray)
    assert main(["finetune", str(QUICKSTART), "train.keep_checkpoints=3"]) == 2
    assert "train.keep_checkpoints: renamed, use checkpoint.keep" in capsys.readouterr().err
    reward = str(CONFIGS / "reward_hp.yaml")
    assert main(["train-reward", reward, "checkpoint.storage_path=/tmp/x"]) == 2
    assert "checkpoint.storage_path: renamed, use output_dir" in capsys.readouterr().err


def test_both_schemas_share_the_common_sections():
    from rlhf.resources import ScalingConfig
    from rlhf.run_sections import CheckpointConfig, MlflowConfig

    fine = load_config(RunConfig, QUICKSTART)
    reward = load_config(RewardTrainConfig, CONFIGS / "reward_ict.yaml")
    for cfg in (fine, reward):
        assert isinstance(cfg.scaling, ScalingConfig)
        assert isinstance(cfg.checkpoint, CheckpointConfig)
        assert isinstance(cfg.mlflow, MlflowConfig)
    # checkpoint.every: null means at every evaluation.
    assert load_config(RunConfig, QUICKSTART, ["checkpoint.every=null"]).checkpoint.every == 10
    assert reward.checkpoint.every == reward.eval_every
    with pytest.raises(ConfigError, match="checkpoint.every=20 must be a multiple of eval_every"):
        load_config(RewardTrainConfig, CONFIGS / "reward_ict.yaml", ["checkpoint.every=20"])
    gpu = load_config(RunConfig, CONFIGS / "sd35_large_turbo_ict_hp.yaml").scaling
    assert gpu.actor_resources().num_gpus == 1 and gpu.ray_resources() == {"CPU": 8, "GPU": 1}
    assert fine.global_batch == fine.scaling.num_workers * fine.train.batch_size


def test_library_layers_never_import_the_actor_shells():
    """Imports point one way: ``rewards`` <- ``rlhf`` <- ``actors``; the entry points (the CLI
    and the quickstart) sit on top."""
    import ast

    root = CONFIGS.parent
    entry = {root / "rlhf" / "cli.py", root / "rlhf" / "quickstart.py"}
    bad = []
    for layer, above in (("rewards", ("rlhf", "actors")), ("rlhf", ("actors",))):
        for path in (root / layer).rglob("*.py"):
            if path in entry:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                bad += [f"{path.relative_to(root)}: {n}" for n in names if n.split(".")[0] in above]
    assert bad == []


def test_refl_mode_validates_and_ignores_k():
    cfg = load_config(RunConfig, CONFIGS / "refl.yaml")
    d = cfg.policy.draft
    assert (d.mode, d.refl_steps, d.refl_loss) == ("refl", [7, 9], "relu")
    assert d.refl_steps[1] < cfg.policy.sampler.steps
    # K is DRaFT's: ReFL does not check it against the steps; DRaFT-LV needs DRaFT.
    cfg = load_config(RunConfig, QUICKSTART, ["policy.draft.mode=refl", "policy.draft.k=9"])
    assert cfg.policy.draft.mode == "refl" and cfg.policy.draft.refl_steps is None
    with pytest.raises(ConfigError, match="policy.draft.lv_n=2 .* needs policy.draft.mode=draft"):
        load_config(RunConfig, QUICKSTART, ["policy.draft.mode=refl", "policy.draft.lv_n=2"])


def test_negative_weights_only_when_allowed():
    cfg = load_config(
        RunConfig, QUICKSTART, ["rewards=[{name: hp, weight: -1}]", "allow_negative_weights=true"]
    )
    assert cfg.reward_specs()[0].weight == -1


@pytest.mark.usefixtures("restore_console")
def test_cli_finetune_bad_input_exits_2_before_ray(tmp_path, capsys, monkeypatch):
    import ray

    def no_ray(*a, **k):
        raise AssertionError("ray.init called for a bad config")

    monkeypatch.setattr(ray, "init", no_ray)
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: {draft: {k: 2}\n")
    for argv, needle in (
        (["finetune", str(bad)], "malformed YAML"),
        (["finetune", str(QUICKSTART), "policy.draft.k=9"], "policy.draft.k=9"),
        (["finetune", str(QUICKSTART), "rewards=[{name: unknown_reward}]"], "rewards[0].name"),
        (["finetune", str(tmp_path / "missing.yaml")], "config file not found"),
        (["finetune"], "give a CONFIG"),
        (["finetune", str(QUICKSTART), "--resume", "abc"], "--resume"),
    ):
        assert main(argv) == 2, argv
        assert needle in capsys.readouterr().err, argv


def test_prompt_schedule_is_deterministic_and_covers_every_prompt():
    prompts = [f"p{i}" for i in range(10)]
    first = [step_batch(prompts, s, 5, seed=3) for s in (1, 2)]
    assert sorted(first[0][0] + first[1][0]) == sorted(prompts)  # one pass = every prompt once
    assert step_batch(prompts, 2, 5, seed=3) == first[1]  # a resumed run gets the same batch
    assert step_batch(prompts, 3, 5, seed=3)[0] != first[0][0]  # reshuffled next pass
    assert len(set(first[0][1] + first[1][1])) == 10  # distinct sampling seeds


def test_read_prompts_from_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n{"text": "y"}\n')
    with pytest.raises(ValueError, match="p.jsonl:2"):
        read_prompts(str(tmp_path / "p.jsonl"))
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(str(tmp_path / "e.txt"))
    assert len(read_prompts("synthetic", n_synthetic=7, seed=1)) == 7


def test_image_stats_expose_hacking_directions():
    import torch

    from rlhf.image_stats import grid, image_stats, to_uint8

    flat = torch.full((2, 3, 32, 32), 0.5)
    noisy = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    red = torch.zeros(2, 3, 32, 32)
    red[:, 0] = 1
    f, n, r = image_stats(flat), image_stats(noisy), image_stats(red)
    assert f["brightness"] == pytest.approx(0.5, abs=1e-6) and f["saturation"] == 0
    assert r["saturation"] == pytest.approx(1.0)
    assert f["edge_density"] == 0 and n["edge_density"] > 0.5
    big_flat, big_noisy = torch.full((1, 3, 128, 128), 0.5), torch.rand(1, 3, 128, 128)
    assert image_stats(big_noisy)["jpeg_ratio"] > 5 * image_stats(big_flat)["jpeg_ratio"]
    g = grid(to_uint8(noisy[:1].repeat(3, 1, 1, 1)))
    assert g.shape == (2 * 34, 2 * 34, 3)


def test_early_stop_rule_counts_evaluations_without_improvement():
    from rlhf.run_plans import RunLoop

    cfg = load_config(RunConfig, QUICKSTART, ["train.eval_every=2", "train.early_stop.patience=2"])
    loop = RunLoop(cfg, None, print, progress=False)
    assert not loop.early_stop(4)  # no evaluation yet
    loop.best_step = 2
    assert not loop.early_stop(4)  # one evaluation since the best
    assert loop.early_stop(6)  # two
    off = RunLoop(load_config(RunConfig, QUICKSTART), None, print, progress=False)
    off.best_step = 2
    assert not off.early_stop(100)


def test_checkpoint_manifest_names_the_bad_file(tmp_path):
    from rlhf.checkpointing import CheckpointError, verify_checkpoint, write_manifest

    ck = tmp_path / "step_000003"
    (ck / "resume").mkdir(parents=True)
    (ck / "resume" / "a.bin").write_bytes(b"x" * 100)
    (ck / "b.json").write_text("{}")
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(ck)
    write_manifest(ck, 3)
    assert verify_checkpoint(ck) == 3
    (ck / "resume" / "a.bin").write_bytes(b"y" * 100)
    with pytest.raises(CheckpointError, match=r"a\.bin: corrupt"):
        verify_checkpoint(ck)
    (ck / "resume" / "a.bin").write_bytes(b"y" * 10)
    with pytest.raises(CheckpointError, match=r"a\.bin: truncated"):
        verify_checkpoint(ck)
    (ck / "b.json").unlink()
    with pytest.raises(CheckpointError, match=r"b\.json: missing"):
        verify_checkpoint(ck)


def test_the_fast_quickstart_reward_jobs_fit_their_triplets(tmp_path):
    """``rlhf quickstart --fast`` builds TRIPLETS[True] prompts, of which about half survive
    as triplets (ties are dropped); one global batch must fit in them, with steps to spare."""
    from rlhf.quickstart import TRIPLETS, reward_config

    data = ["data.train=synthetic", "data.eval=synthetic"]  # the batch is what is checked
    for kind in ("ict", "hp"):
        for fast in (True, False):
            cfg = reward_config(kind, tmp_path, tmp_path, fast, data)
            global_batch = cfg.optim.batch_size * cfg.scaling.num_workers
            assert 3 * global_batch <= TRIPLETS[fast][0] // 2, (kind, fast, global_batch)


def test_quickstart_reuses_triplets_only_from_the_same_world_and_sizes(tmp_path):
    """Triplets kept in quickstart_out/data are sampled from a world's SD3: after the world
    is rebuilt (its manifest changes) they are stale and must be made again."""
    import json

    from rlhf.quickstart import cached_triplets, world_id

    world = tmp_path / "world"
    world.mkdir()
    (world / "manifest.json").write_text('{"files": {}}')
    key = {"prompts": [120, 60], "world": world_id(world)}
    stats_file = tmp_path / "stats.json"
    assert cached_triplets(stats_file, key) is None  # nothing kept yet
    stats_file.write_text(json.dumps({"train": {"triplets": 50}, **key}))
    assert cached_triplets(stats_file, key)["train"] == {"triplets": 50}
    assert cached_triplets(stats_file, {**key, "prompts": [600, 150]}) is None
    (world / "manifest.json").write_text('{"files": {"sd3": 1}}')  # the world was rebuilt
    assert cached_triplets(stats_file, {**key, "world": world_id(world)}) is None
    stats_file.write_text(json.dumps({"train": {}, "prompts": [120, 60]}))  # an older cache
    assert cached_triplets(stats_file, key) is None
