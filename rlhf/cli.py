"""The ``rlhf`` command line: parses, validates and calls into the library.

Known errors (bad config, bad data, missing files) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

import yaml

from rewards.errors import ConfigError, UserError

log = logging.getLogger("rlhf")


def _reward_arg(text: str) -> dict:
    """``ict`` or a YAML mapping ``{name: ict, checkpoint: models:/ict/1}``."""
    text = text.strip()
    if text.startswith("{"):
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise argparse.ArgumentTypeError(f"cannot parse reward spec {text!r}: {e}") from e
        if not isinstance(spec, dict):
            raise argparse.ArgumentTypeError(f"reward spec {text!r} must be a mapping")
        return spec
    return {"name": text}


def cmd_rewards_list(args) -> int:
    from rewards.builtin_rewards import list_rewards

    rewards = list_rewards()
    width = max(map(len, rewards))
    for name, doc in rewards.items():
        print(f"{name:<{width}}  {doc}")
    print("\nAny 'package.module:factory' import path works too; see README.")
    return 0


def cmd_data_synth(args) -> int:
    from rewards.synthetic import write_synthetic_parquet

    out = write_synthetic_parquet(args.out, args.n, seed=args.seed, image_size=args.image_size)
    print(f"wrote {args.n} synthetic triplets to {out}")
    return 0


def cmd_data_convert(args) -> int:
    from rewards.data import convert_pickhigh

    counts = convert_pickhigh(
        args.pickle,
        args.root,
        args.split,
        args.out,
        allow_pickle=args.allow_pickle,
        embed_images=not args.no_embed,
    )
    print(f"wrote {counts['written']} triplets to {args.out} ({counts['skipped']} skipped)")
    return 0


def cmd_eval_reward(args) -> int:
    from rewards.data import TripletDataset
    from rewards.evaluate import evaluate_reward, format_table, score_triplets, write_json
    from rewards.registry import RewardSpec, build_reward
    from rewards.training import make_eval_loader

    specs = [RewardSpec.from_dict(s, f"--reward[{i}]") for i, s in enumerate(args.reward)]
    ds = TripletDataset(args.data, image_root=args.image_root, image_size=args.image_size)
    loader = make_eval_loader(ds, args.batch_size)
    results = {}
    for i, spec in enumerate(specs):
        reward = build_reward(spec, f"--reward[{i}]")
        scores = score_triplets(reward, loader)
        if scores.shape[0] == 0:
            raise ConfigError(f"{args.data}: no readable triplets ({ds.num_skipped} skipped)")
        results.update(evaluate_reward(spec.label or spec.name, reward, loader, scores=scores))
    print(format_table(results))
    if ds.num_skipped:
        print(f"({ds.num_skipped} corrupt or missing triplets skipped)")
    if args.json:
        write_json(
            {"data": str(args.data), "skipped": ds.num_skipped, "results": results}, args.json
        )
        print(f"wrote {args.json}")
    return 0


def cmd_train_reward(args) -> int:
    from rlhf.config import load_config
    from rlhf.reward_run_config import RewardTrainConfig
    from rlhf.train_reward import run_job

    cfg = load_config(RewardTrainConfig, args.config, args.overrides)
    init_ray(args.verbose)
    summary = run_job(cfg)
    print(
        f"done: {cfg.kind} run {summary['run_id']} best mean acc {summary['best_mean_acc']:.2f}% "
        f"at step {summary['best_step']}; registered {summary['model_uri']}"
    )
    return 0


def init_ray(verbose: bool = False, log_to_driver: bool = True) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``), else start a local Ray;
    every worker gets this process's console rules (:mod:`rlhf.console`). ``log_to_driver``
    False: the workers' output stays in their Ray log files."""
    import os

    import ray

    from rlhf import console

    console.setup(verbose)  # again: importing Ray configured its loggers
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        print(f"connecting to Ray at {address}" if address else "starting a local Ray...")
        ray.init(
            # "local": a new Ray, never whatever cluster `ray start` left on this machine.
            address=address or "local",
            configure_logging=False,
            log_to_driver=log_to_driver,
            runtime_env=console.ray_runtime_env(verbose),
        )


def cmd_finetune(args) -> int:
    from actors.finetune_run import FinetuneRun
    from rlhf.config import load_config
    from rlhf.run_config import RunConfig
    from rlhf.run_records import RunFailed, RunStopped, summary_lines

    if args.resume:
        if args.config or args.overrides:
            raise ConfigError(
                "--resume RUN_ID takes its config from the run; drop CONFIG/overrides"
            )
        cfg = None
    else:
        if not args.config:
            raise ConfigError("give a CONFIG file (or --resume RUN_ID)")
        cfg = load_config(RunConfig, args.config, args.overrides)
        cfg.check_inputs()
    import ray

    job = FinetuneRun(cfg, resume_run_id=args.resume)
    try:
        try:
            job.prepare()  # a bad resume fails here, before Ray
            # The coordinator relays the run's own lines; the workers' output only with -v.
            init_ray(args.verbose, log_to_driver=args.verbose)
            summary = job.run()
        finally:
            ray.shutdown()  # before the last lines: no worker output streams in after them
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RunFailed as e:
        if args.verbose and e.__cause__ is not None:
            traceback.print_exception(e.__cause__, file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if job.run_id is None:
            raise
        print(
            f"interrupted: run {job.run_id} marked KILLED; resume with: {job.resume_command()}",
            file=sys.stderr,
        )
        return 130
    print("\n".join(summary_lines(summary)))
    return 0


def cmd_quickstart(args) -> int:
    from rlhf.quickstart import run_quickstart

    init_ray(args.verbose)
    run_quickstart(out=Path(args.out), fast=args.fast)
    return 0


def cmd_world_build(args) -> int:
    from rewards.world import ASSETS
    from rlhf.world.build import STAGES, build_world

    stages = tuple(args.stages.split(",")) if args.stages else STAGES
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {unknown} (known: {', '.join(STAGES)})")
    out = Path(args.out) if args.out else ASSETS
    result = build_world(
        out,
        scale=args.scale,
        seed=args.seed,
        stages=stages,
        jobs=args.jobs,
        clip_vision=args.clip_vision,
        precision=args.precision,
    )
    print(json.dumps(result["report"], indent=2))
    print(f"world in {out} (manifest.json lists every file with its sha256)")
    return 0


def cmd_world_verify(args) -> int:
    from rewards.world import ASSETS
    from rlhf.world.build import verify_manifest

    out = Path(args.out) if args.out else ASSETS
    bad = verify_manifest(out)
    if bad:
        print(f"error: {len(bad)} file(s) differ from {out}/manifest.json: {bad}", file=sys.stderr)
        return 1
    print(f"{out}: every file matches manifest.json")
    return 0


DESCRIPTION = """\
Train reward models for text-to-image generation (ICT, HP) and fine-tune Stable Diffusion 3.5
against them with DRaFT-K, on one machine or a Ray cluster, tracked in MLflow."""

EPILOG = """\
examples:
  rlhf quickstart                                     the whole pipeline on tiny CPU models
  rlhf rewards list                                   the built-in rewards
  rlhf data synth triplets.parquet --n 1000           synthetic preference triplets
  rlhf eval-reward triplets.parquet --reward hp --reward "{name: ict, checkpoint: models:/ict/1}"
  rlhf train-reward configs/reward_ict.yaml optim.lr=3e-4
  rlhf finetune configs/quickstart.yaml train.max_steps=50
  rlhf finetune --resume RUN_ID                       continue a stopped run

A bad config or input fails before anything starts: one line naming the key, exit status 2.
Run tracking: MLFLOW_TRACKING_URI (default: ./mlflow.db). Cluster: RAY_ADDRESS or ray job
submit. Add -v (before the command) for library messages, warnings and tracebacks."""


def _parser(sub, name: str, help: str, **kw) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".", **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlhf",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show library messages, Python warnings, debug lines and tracebacks",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    _add_quickstart(sub)
    _add_rewards(sub)
    _add_data(sub)
    _add_eval_reward(sub)
    _add_train_reward(sub)
    _add_finetune(sub)
    _add_world(sub)
    return p


def _add_quickstart(sub) -> None:
    q = _parser(sub, "quickstart", "CPU end-to-end demo on tiny models (no downloads)")
    q.add_argument("--out", default="quickstart_out", help="folder for data, results, images")
    q.add_argument("--fast", action="store_true", help="fewer steps (a smoke test, for CI)")
    q.set_defaults(func=cmd_quickstart)


def _add_rewards(sub) -> None:
    r = _parser(sub, "rewards", "the reward registry (rlhf rewards list)")
    rs = r.add_subparsers(dest="rewards_cmd", required=True, metavar="COMMAND")
    _parser(rs, "list", "list built-in rewards").set_defaults(func=cmd_rewards_list)


def _add_data(sub) -> None:
    d = _parser(sub, "data", "triplet data tools")
    ds = d.add_subparsers(dest="data_cmd", required=True, metavar="COMMAND")
    s = _parser(ds, "synth", "write synthetic triplets to Parquet")
    s.add_argument("out", help="the Parquet file to write")
    s.add_argument("--n", type=int, default=1000, help="number of triplets (default: 1000)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")
    s.set_defaults(func=cmd_data_synth)
    c = _parser(ds, "convert", "convert the public Pick-High release to Parquet")
    c.add_argument("--pickle", required=True, help="the split's pickled pandas frame")
    c.add_argument(
        "--root", required=True, help="folder holding pick_easy_img/ and pick_refine_img/"
    )
    c.add_argument("--split", required=True, help="the split's name, e.g. train or test")
    c.add_argument("--out", required=True, help="the Parquet file to write")
    c.add_argument(
        "--allow-pickle",
        action="store_true",
        help="reading a pickle runs code from the file: only for files you trust",
    )
    c.add_argument("--no-embed", action="store_true", help="keep image paths, not bytes")
    c.set_defaults(func=cmd_data_convert)


def _add_eval_reward(sub) -> None:
    e = _parser(sub, "eval-reward", "preference accuracy of rewards on triplets")
    e.add_argument("data", metavar="DATA", help="a Parquet triplet file (see rlhf data)")
    e.add_argument(
        "--reward",
        action="append",
        type=_reward_arg,
        required=True,
        help="a name, or a YAML mapping like '{name: ict, checkpoint: models:/ict/1}'; repeatable",
    )
    e.add_argument(
        "--image-root", default=None, help="folder that relative image paths in DATA are under"
    )
    e.add_argument(
        "--image-size", type=int, default=224, help="images are resized to this side (default: 224)"
    )
    e.add_argument(
        "--batch-size", type=int, default=32, help="triplets scored at once (default: 32)"
    )
    e.add_argument("--json", default=None, help="also write the results here")
    e.set_defaults(func=cmd_eval_reward)


def _add_train_reward(sub) -> None:
    t = _parser(sub, "train-reward", "train ICT or HP as a Ray Train job")
    t.add_argument("config", help="a reward-training config, e.g. configs/reward_ict.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4")
    t.set_defaults(func=cmd_train_reward)


def _add_finetune(sub) -> None:
    f = _parser(sub, "finetune", "DRaFT-K fine-tuning of SD3/SD3.5 against rewards")
    f.add_argument("config", nargs="?", help="a run config, e.g. configs/quickstart.yaml")
    f.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10")
    f.add_argument("--resume", metavar="RUN_ID", help="continue an MLflow run from its checkpoint")
    f.set_defaults(func=cmd_finetune)


def _add_world(sub) -> None:
    from rewards.world import VISION_TOWERS
    from rewards.world.precision import PRECISIONS

    w = _parser(sub, "world", "the miniature world: pretrained tiny CLIP, SD3 and judge")
    ws = w.add_subparsers(dest="world_cmd", required=True, metavar="COMMAND")
    wb = _parser(
        ws,
        "build",
        "build the world from scratch, seeded, stage by stage (finished stages are kept)",
    )
    wb.add_argument(
        "--out",
        default=None,
        help="folder to build into (default: the shipped rewards/world/assets)",
    )
    wb.add_argument("--scale", choices=("full", "toy"), default="full", help="toy: the CI recipe")
    wb.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    wb.add_argument(
        "--stages", default=None, help="comma-separated subset of clip,judge,vae,sd3,ict,report"
    )
    wb.add_argument(
        "--jobs", type=int, default=2, help="processes (2: the CLIP beside the judge and VAE)"
    )
    wb.add_argument(
        "--clip-vision",
        choices=VISION_TOWERS,
        default=None,
        help="the world CLIP's image tower (default: the recipe's, resnet)",
    )
    wb.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="the training stages' arithmetic (default: the recipe's, fp32; bf16: CPU "
        "autocast, faster on CPUs with AMX)",
    )
    wb.set_defaults(func=cmd_world_build)
    wv = _parser(ws, "verify", "check the world's files against its manifest")
    wv.add_argument("--out", default=None, help="the world folder (default: the shipped one)")
    wv.set_defaults(func=cmd_world_verify)


def main(argv: list[str] | None = None) -> int:
    from rlhf import console

    parser = build_parser()
    args = parser.parse_args(argv)
    console.setup(args.verbose)
    try:
        return args.func(args)
    except UserError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
