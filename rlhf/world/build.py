"""``rlhf world build``: the miniature world from scratch, seeded, stage by stage.

Stages (each writes a folder under ``out`` and is skipped when that folder is complete):

1. ``clip``   the tiny open_clip CLIP, contrastive on renders (+ its tokenizer);
2. ``judge``  GenEval-mini, a detector trained on renders (evaluation only);
3. ``vae``    a tiny ``AutoencoderKL`` (factor 4, 4 latent channels) trained on renders;
4. ``sd3``    an SD3 transformer, flow matching on the VAE's latents of renders, the CLIP's
              text tower in both text-encoder slots: a diffusers folder;
5. ``ict``    an ICT reward trained from the CLIP on Pick-High-mini triplets of the base SD3
              (``rlhf.world.triplets``), stored in fp16: what the fine-tuning test optimises;
6. ``report`` held-out figures: CLIP caption choice, judge accuracy, the base generator's
              GenEval-mini, into ``report.json``; and ``manifest.json``: size and sha256 of
              every file, the command and the seconds each stage took.

``--scale toy`` builds the same recipe at toy size (the CI test); ``full`` is what ships in
``rewards/world/assets`` (CLIP, judge) and ``rlhf/world/assets/sd3``. The stages' training is
in :mod:`rlhf.world.stages`; this module runs them and keeps the books.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from rewards.checkpoints import file_sha256
from rewards.errors import ConfigError

STAGES = ("clip", "judge", "vae", "sd3", "ict", "report")


@dataclass
class Recipe:
    """Sizes and steps of every stage. ``full`` with ``--jobs 2`` took 59-66 min on 2 idle
    cores (BENCHMARKS.md section 0; the issue asks for at most 30): 43-50 of them are the SD3's
    20000 steps, which it needs to follow prompts (at 6000 steps it ignored shape words)."""

    clip_pairs: int = 20000
    clip_steps: int = 2400
    clip_batch: int = 64
    # "resnet" (open_clip's ModifiedResNet) binds shape and texture where the ViT image tower
    # of earlier builds did not: caption choice 91.7% against 48.3% (BENCHMARKS.md section 0).
    clip_vision: str = "resnet"
    judge_train: int = 8000
    judge_steps: int = 900
    sd3_images: int = 24000
    # The VAE trains on the first vae_images of the SD3's renders (the same draws). 12000: the
    # shipped VAE, trained when sd3_images was 12000 and unchanged since; a from-scratch build
    # of this recipe remakes it bit for bit (BENCHMARKS.md section 0).
    vae_images: int = 12000
    vae_steps: int = 2500
    vae_batch: int = 16
    vae_factor: int = 4  # 64 px -> 16x16 latents (2: 32x32)
    sd3_steps: int = 20000
    sd3_batch: int = 32
    # Above 0, the SD3's two text encoders train with it at this learning rate; 0 (shipped)
    # keeps them the frozen CLIP text tower. 1e-3 did not help in a full build (BENCHMARKS.md
    # section 0: GenEval-mini 0.217 against a chance level of 0.179).
    sd3_text_lr: float = 0.0
    # The SD3's loss counts object pixels 1 + sd3_object_weight times
    # (rlhf.world.flow_matching.latent_weights) at timesteps below sd3_weight_below (1.0: all).
    # 0 (shipped): the weight biases the SD3 toward extra objects; 4 helped only the 6000-step
    # SD3 of earlier builds (BENCHMARKS.md section 0).
    sd3_object_weight: float = 0.0
    sd3_weight_below: float = 1.0
    sd3_patch: int = 2
    # Representation alignment (REPA): the SD3's tokens after block 1 are pulled toward the
    # world CLIP's ResNet features after this stage (1-4; 0: off) with this weight
    # (rlhf.world.flow_matching.train_transformer's ``align``).
    sd3_align_stage: int = 0
    sd3_align_weight: float = 0.5
    ict_prompts: int = 600
    ict_epochs: int = 3
    eval_prompts: int = 120
    sample_steps: int = 10
    # CFG scale of the world's samples: GenEval-mini 0.242 at 2.0 against 0.154 at 1.0 (no
    # CFG) and 0.221 at 3.0 (BENCHMARKS.md section 0).
    guidance: float = 2.0
    # The training stages' arithmetic (rewards.world.precision): "fp32" (shipped) or "bf16"
    # (CPU autocast; faster where the CPU has AMX, BENCHMARKS.md section 0).
    precision: str = "fp32"

    @classmethod
    def for_scale(cls, scale: str) -> Recipe:
        if scale == "full":
            return cls()
        if scale == "toy":
            return cls(
                clip_pairs=256,
                clip_steps=8,
                clip_batch=16,
                judge_train=256,
                judge_steps=8,
                sd3_images=128,
                vae_images=128,
                vae_steps=4,
                vae_batch=8,
                sd3_steps=6,
                sd3_batch=8,
                ict_prompts=24,
                ict_epochs=1,
                eval_prompts=12,
                sample_steps=2,
            )
        raise ValueError(f"scale={scale!r} must be 'full' or 'toy'")


def file_table(root: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and p.name != "manifest.json"
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def verify_manifest(root: str | Path) -> list[str]:
    """Files under ``root`` whose size or hash differs from ``manifest.json`` (or are missing)."""
    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    bad = []
    for name, want in manifest["files"].items():
        p = root / name
        if not p.is_file() or p.stat().st_size != want["bytes"] or file_sha256(p) != want["sha256"]:
            bad.append(name)
    return bad


def _done(folder: Path) -> bool:
    return (folder / ".complete").is_file()


# What each stage is made from besides its own recipe fields: a kept stage is only as good as
# the stages it was trained on (the VAE's folder goes once the SD3 holds its copy).
UPSTREAM = {
    "clip": (),
    "judge": (),
    "vae": (),
    "sd3": ("clip", "vae"),
    "ict": ("clip", "judge", "sd3"),
    "report": ("clip", "judge", "sd3", "ict"),
}


class _Reads:
    """The recipe, noting each field a stage reads: its ``.complete`` records them, and a
    later build keeps the stage only if its recipe still has those values."""

    def __init__(self, recipe: Recipe):
        self._recipe, self.read = recipe, {}

    def __getattr__(self, name: str):
        if name.startswith("_") or name == "read":  # not set yet (a copy being made)
            raise AttributeError(name)
        value = getattr(self._recipe, name)
        self.read[name] = value
        return value


def _made(folder: Path) -> dict | None:
    """What a finished stage was made with (``{"scale", "seed", "recipe": {field: value}}``,
    its upstream stages' fields included); None for an unfinished stage or one built before
    stages recorded it."""
    path = folder / ".complete"
    text = path.read_text() if path.is_file() else ""
    if not text.strip():
        return None
    try:
        made = json.loads(text)
        made["scale"], made["seed"], dict(made["recipe"])
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(
            f"{path} is not a stage record ({e}): remove {folder} to rebuild it"
        ) from e
    return made


def _check_kept(out: Path, stages, recipe: Recipe, scale: str, seed: int) -> None:
    """Refuse to build ``stages`` on finished stages (those asked for and those they are made
    from) that another recipe, scale or seed made: they would be kept as they are, and the
    manifest would then claim this recipe for them."""
    needed, todo = set(), [st for st in stages if st in UPSTREAM]
    while todo:
        st = todo.pop()
        if st not in needed:
            needed.add(st)
            todo.extend(UPSTREAM[st])
    wrong = []
    for st in sorted(needed & set(STAGES)):
        folder = out / st
        made = _made(folder)
        if made is None:
            continue
        fields = {k: getattr(recipe, k, "<no such field>") for k in made["recipe"]}
        now = {"scale": scale, "seed": seed, **fields}
        was = {"scale": made["scale"], "seed": made["seed"], **made["recipe"]}
        diff = [f"{k}={v!r} (now {now[k]!r})" for k, v in was.items() if now[k] != v]
        if diff:
            more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
            wrong.append(f"{folder} was built with {', '.join(diff[:4])}{more}")
    if wrong:
        raise ConfigError(
            "; ".join(wrong) + ": a build keeps finished stages as they are, so remove "
            "those folders to rebuild them with this recipe, or build into another --out"
        )


def _finish(tmp: Path, folder: Path, seconds: float, made: dict) -> None:
    """Move a finished stage into place; its ``.complete`` records what it was ``made`` with,
    ``.seconds/<stage>`` the seconds it took."""
    (tmp / ".complete").write_text(json.dumps(made, indent=1, sort_keys=True) + "\n")
    (folder.parent / ".seconds").mkdir(exist_ok=True)
    (folder.parent / ".seconds" / folder.name).write_text(f"{seconds:.1f}\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def build_world(
    out: str | Path,
    scale: str = "full",
    seed: int = 0,
    stages=STAGES,
    threads: int | None = 1,
    jobs: int = 1,
    clip_vision: str | None = None,
    precision: str | None = None,
) -> dict:
    """Build the ``stages`` into ``out`` (see the module docstring); returns the report and
    the manifest. ``threads``: torch threads per process (one by default: two OpenMP threads
    on two cores stall badly whenever anything else runs there; None leaves torch's setting).
    ``jobs=2`` trains the CLIP and then the judge in a second process while this one trains
    the VAE (neither depends on the CLIP); the SD3 waits for both and, alone on the machine
    then, trains with ``threads * jobs`` threads. ``clip_vision``: the CLIP's image tower,
    ``vit`` or ``resnet``; ``precision``: ``fp32`` or ``bf16`` (None: the recipe's)."""
    from rlhf.world.stages import world_report

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = _recipe(scale, clip_vision, precision)
    _check_kept(out, stages, recipe, scale, seed)
    timings = _train_stages(out, recipe, stages, scale, seed, threads, jobs)
    report = {}
    if "report" in stages:
        t = time.time()
        report = world_report(out, recipe)
        timings["report"] = time.time() - t
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    manifest = _write_manifest(out, recipe, scale, seed, jobs, timings)
    return {"report": report, "manifest": manifest}


def _train_stages(
    out: Path, recipe: Recipe, stages, scale: str, seed: int, threads: int | None, jobs: int
) -> dict[str, float]:
    """Train the unfinished ``stages`` of the world in ``out``, in order (the CLIP in a
    process of its own with ``jobs > 1``); the seconds each took."""
    from rlhf.world.stages import (
        train_world_clip,
        train_world_ict,
        train_world_judge,
        train_world_sd3,
        train_world_vae,
    )

    timings: dict[str, float] = {}
    made = (recipe, scale, seed)
    vae_dir, sd3_dir = out / "vae", out / "sd3"

    side_stages = tuple(st for st in ("clip", "judge") if st in stages and not _done(out / st))
    side = None
    if jobs > 1 and side_stages:
        # The CLIP (the longest stage but the SD3) and then the judge in a second process,
        # beside the VAE here: by idle-machine stage times the two sides end close together.
        import multiprocessing as mp

        side = mp.get_context("spawn").Process(
            target=build_world,
            args=(out, scale, seed, side_stages, threads, 1, recipe.clip_vision, recipe.precision),
        )
        side.start()
    else:
        if "clip" in side_stages:
            _stage(out, "clip", lambda d, r: train_world_clip(d, r, seed, scale), timings, made)
        if "judge" in side_stages:
            _stage(out, "judge", lambda d, r: train_world_judge(d, r, seed), timings, made)
    if ("vae" in stages or "sd3" in stages) and not (_done(vae_dir) or _done(sd3_dir)):
        _stage(out, "vae", lambda d, r: train_world_vae(d, r, seed, scale), timings, made)
    if side is not None:
        side.join()
        failed = [st for st in side_stages if not _done(out / st)]
        if side.exitcode != 0 or failed:
            raise RuntimeError(
                f"the {', '.join(failed) or 'side'} stage failed in its process "
                f"(exit {side.exitcode})"
            )
    if "sd3" in stages and not _done(sd3_dir):
        # Alone on the machine now: every process's threads (two threads train it 1.6x faster
        # than one on two idle cores; BENCHMARKS.md section 0).
        with _torch_threads(threads * jobs if threads else None):
            _stage(out, "sd3", lambda d, r: train_world_sd3(d, out, r, seed, scale), timings, made)
        shutil.rmtree(vae_dir)  # the diffusers folder holds its own copy
    if "ict" in stages and not _done(out / "ict"):
        _stage(out, "ict", lambda d, r: train_world_ict(out, d, r, seed), timings, made)
    return timings


@contextmanager
def _torch_threads(n: int | None):
    """torch's intra-op threads set to ``n`` inside the block (None: unchanged)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _recipe(scale: str, clip_vision: str | None, precision: str | None = None) -> Recipe:
    """The recipe of ``scale``, with its CLIP's image tower ``clip_vision`` and the stages'
    ``precision`` where given."""
    from rewards.world import VISION_TOWERS
    from rewards.world.precision import check_precision

    recipe = Recipe.for_scale(scale)
    if clip_vision is not None:
        if clip_vision not in VISION_TOWERS:
            raise ValueError(
                f"clip_vision={clip_vision!r} must be one of {', '.join(VISION_TOWERS)}"
            )
        recipe = replace(recipe, clip_vision=clip_vision)
    if precision is not None:
        recipe = replace(recipe, precision=check_precision(precision))
    return recipe


def _stage(
    out: Path,
    name: str,
    train: Callable[[Path, _Reads], object],
    timings: dict,
    made: tuple[Recipe, str, int],
) -> None:
    """Run one stage, ``train(folder, recipe)``, into a fresh ``out/.<name>.tmp`` and move it
    into place as ``out/<name>``, recording the ``made`` (recipe, scale, seed) fields it read
    and those of its upstream stages; what ``train`` returns is printed with its seconds."""
    recipe, scale, seed = made
    t = time.time()
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    reads = _Reads(recipe)
    extra = train(tmp, reads)
    fields = {}
    for up in UPSTREAM[name]:
        fields.update((_made(out / up) or {}).get("recipe", {}))
    fields.update(reads.read)
    _finish(tmp, out / name, time.time() - t, {"scale": scale, "seed": seed, "recipe": fields})
    timings[name] = time.time() - t
    print(
        f"[world] {name}: {timings[name]:.0f} s" + ("" if extra is None else f" {extra}"),
        flush=True,
    )


def _write_manifest(
    out: Path, recipe: Recipe, scale: str, seed: int, jobs: int, timings: dict
) -> dict:
    """``manifest.json``: the command, the recipe, each stage's seconds and every file."""
    seconds = {
        st: float((out / ".seconds" / st).read_text())
        for st in STAGES
        if (out / ".seconds" / st).is_file()
    }
    if "report" in timings:
        seconds["report"] = round(timings["report"], 1)
    manifest = {
        "command": f"rlhf world build{_out_arg(out)} --scale {scale} --seed {seed} --jobs {jobs}"
        + (f" --clip-vision {recipe.clip_vision}" if recipe.clip_vision != "resnet" else "")
        + (f" --precision {recipe.precision}" if recipe.precision != "fp32" else ""),
        "recipe": asdict(recipe),
        "seconds": seconds,
        "files": file_table(out),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _out_arg(out: Path) -> str:
    from rewards.world import ASSETS

    return "" if out.resolve() == ASSETS.resolve() else f" --out {out}"
