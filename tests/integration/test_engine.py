"""The DeepSpeed engine over gloo, two real processes: ZeRO-2 and ZeRO-3 with 2 ranks x batch B
give the update of 1 process x batch 2B; the LoRA export gathers the same weights on every
rank; the resume bundle restores step, extras, RNG and optimiser state.

The 1 x 2B reference runs in this process with :class:`rlhf.engine.PlainEngine` (torch's
AdamW, as DeepSpeed's ``torch_adam``). Adam divides by the gradient's running RMS, which would
hide a wrong gradient scale (a sum over ranks instead of a mean); ``eps=1e-3`` is far above the
gradients here (< 1e-5), so the update is ~ ``lr * m / eps`` and the comparison sees the scale.
"""

import json
import os
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration

PROMPTS = ["a red cube", "a blue ball", "a cat on a mat", "a green tree"]
B = 2  # per rank; the reference takes all 4 at once
STEPS = 2
STAGES = (2, 3)


def _engine_cfg(stage):
    from rlhf.engine import EngineConfig

    # No persisted parameters, no prefetch: the tiny model's parameters stay partitioned under
    # ZeRO-3 and go through the gather/release path of a big model's.
    return EngineConfig(
        zero_stage=stage,
        lr=1.0,
        betas=[0.5, 0.9],
        eps=1e-3,
        grad_clip=1.0,
        zero3_persistence_threshold=0,
        zero3_prefetch_bucket_size=0,
    )


def _setup(seed=0):
    """Tiny SD3 + LoRA with random B (so every adapter weight moves) and a tiny reward."""
    from rewards.registry import build_reward
    from rlhf.generator import FinetuneConfig, GeneratorConfig, load_generator

    gen = load_generator(
        GeneratorConfig(model="tiny", load_t5=False), FinetuneConfig(rank=2, alpha=2.0), "cpu"
    )
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for n, p in gen.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    torch.manual_seed(0)
    reward = build_reward({"name": "ict_hp", "options": {"backbone": "tiny"}}).eval()
    return gen, reward.requires_grad_(False)


def _sampler():
    from rlhf.sampler import SamplerConfig

    return SamplerConfig(steps=2, height=32, width=32, max_sequence_length=16)


def _batch(step, lo, hi):
    seeds = [100 * step + i for i in range(len(PROMPTS))]
    return PROMPTS[lo:hi], seeds[lo:hi]


def _worker(rank, world, port, out):
    try:
        _run_rank(rank, world, port, out)
    except BaseException:
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
        raise


def _run_rank(rank, world, port, out):
    import deepspeed

    from rlhf.draft import DraftConfig, draft_step
    from rlhf.engine import build_engine
    from rlhf.export import export_lora, load_resume, lora_state_dict, save_resume

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    results = {}
    for stage in STAGES:
        gen, reward = _setup()
        engine = build_engine(gen.transformer, _engine_cfg(stage), B, "lora")
        assert engine.zero_optimization_stage() == stage
        draft = DraftConfig(k=1)
        for step in range(STEPS):
            ps, ss = _batch(step, rank * B, (rank + 1) * B)
            draft_step(engine, gen, {"reward": (1.0, reward)}, ps, ss, _sampler(), draft, step)
        sd = lora_state_dict(engine)  # collective: gathers ZeRO-3 partitions
        export_lora(engine, out / f"lora{stage}")

        # Resume bundle: save, take one more step, restore, take it again.
        torch.manual_seed(1234 + rank)
        save_resume(engine, out / f"resume{stage}", STEPS, {"data_position": 7 + stage})
        after_save = torch.rand(3)
        saved = _saved_module_keys(out / f"resume{stage}")
        ps, ss = _batch(STEPS, rank * B, (rank + 1) * B)
        draft_step(engine, gen, {"reward": (1.0, reward)}, ps, ss, _sampler(), draft, STEPS)
        once = lora_state_dict(engine)
        step, state = load_resume(engine, out / f"resume{stage}")
        restored = torch.rand(3)
        back = lora_state_dict(engine)
        draft_step(engine, gen, {"reward": (1.0, reward)}, ps, ss, _sampler(), draft, STEPS)
        twice = lora_state_dict(engine)
        results[stage] = {
            "step": step,
            "state": state,
            "rng_restored": bool(torch.equal(after_save, restored)),
            "back_max_diff": max(float((back[k] - sd[k]).abs().max()) for k in sd),
            "redo_max_diff": max(float((twice[k] - once[k]).abs().max()) for k in once),
            "redo_moved": max(float((once[k] - sd[k]).abs().max()) for k in once),
            # Trainable state only: no frozen base weight in the bundle, every adapter in it.
            "frozen_saved": len(saved & _frozen(gen.transformer)),
            "trainable_missing": len(_trainable(gen.transformer) - saved),
            "fixed_saved": [k for k in saved if k.endswith("pos_embed")],
        }
        torch.save(sd, out / f"sd{stage}_rank{rank}.pt")
    (out / f"result{rank}.json").write_text(json.dumps(results))


def _saved_module_keys(bundle) -> set[str]:
    from rlhf.export import _deepspeed_safe_globals

    keys = set()
    for f in (bundle / "deepspeed").rglob("*model_states.pt"):
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            keys |= set(torch.load(f, map_location="cpu", weights_only=True)["module"])
    return keys


def _frozen(module) -> set[str]:
    return {n for n, p in module.named_parameters() if not p.requires_grad}


def _trainable(module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def _spawn(world, out, timeout=420):
    ctx = mp.start_processes(
        _worker, args=(world, free_port(), out), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish in {timeout} s")
    except Exception as e:
        errors = "\n".join(p.read_text() for p in sorted(out.glob("error*.txt")))
        raise AssertionError(f"{e}\n{errors}") from e
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _reference():
    """1 process x batch 2B, same config, plain torch AdamW."""
    from rlhf.draft import DraftConfig, draft_step
    from rlhf.engine import PlainEngine
    from rlhf.export import lora_state_dict

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen, reward = _setup()
        init = lora_state_dict(gen.transformer)
        engine = PlainEngine(gen.transformer, _engine_cfg(None))
        for step in range(STEPS):
            ps, ss = _batch(step, 0, len(PROMPTS))
            draft_step(
                engine, gen, {"reward": (1.0, reward)}, ps, ss, _sampler(), DraftConfig(k=1), step
            )
        return init, lora_state_dict(gen.transformer)
    finally:
        torch.set_num_threads(n)


def test_two_ranks_match_one_rank_with_double_batch_zero2_and_zero3(tmp_path):
    from safetensors.torch import load_file

    from rlhf.export import LORA_WEIGHTS

    _spawn(2, tmp_path)
    init, ref = _reference()
    ref_delta = {k: ref[k] - init[k] for k in ref}
    scale = max(float(d.abs().max()) for d in ref_delta.values())
    assert scale > 1e-3  # the update is not negligible
    for stage in STAGES:
        sds = [torch.load(tmp_path / f"sd{stage}_rank{r}.pt") for r in range(2)]
        assert sds[0].keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(sds[0][k], sds[1][k], rtol=0, atol=0)  # ranks agree
            torch.testing.assert_close(
                sds[0][k] - init[k], ref_delta[k], rtol=0, atol=1e-3 * scale, msg=f"{stage} {k}"
            )
        exported = load_file(str(tmp_path / f"lora{stage}" / LORA_WEIGHTS))
        assert len(exported) == len(ref)
        for k, v in sds[0].items():
            torch.testing.assert_close(exported[f"transformer.{k}"], v, rtol=0, atol=0)

        for r in range(2):
            res = json.loads((tmp_path / f"result{r}.json").read_text())[str(stage)]
            assert res["step"] == STEPS and res["state"] == {"data_position": 7 + stage}
            assert res["rng_restored"]
            assert res["frozen_saved"] == 0 and res["trainable_missing"] == 0, res
            assert res["fixed_saved"] == [], res  # SD3's positional table is rebuilt, not saved
            assert res["back_max_diff"] == 0.0  # weights restored exactly
            assert res["redo_moved"] > 0
            # Same step from the restored optimiser state (Adam moments) -> same weights.
            assert res["redo_max_diff"] <= 1e-6 * max(res["redo_moved"], 1e-12) + 1e-9
        assert (tmp_path / f"resume{stage}" / "trainer_state.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
