"""Saving the policy: the export (what others load) and the resume bundle (what we restart from).

- **Export**: LoRA weights in the diffusers format (``pytorch_lora_weights.safetensors`` with
  the adapter config as metadata), loadable with ``StableDiffusion3Pipeline.load_lora_weights``;
  with full fine-tuning, the transformer as a diffusers folder (safetensors).
- **Resume bundle**: the DeepSpeed engine and optimiser state (DeepSpeed's own checkpoint,
  partitioned per rank), plus ``trainer_state.json`` (step, data position, anything
  JSON-able) and each rank's RNG states (``rng/rank<r>.safetensors`` + ``.json``).
  DeepSpeed's loader unpickles its files; here it runs with ``weights_only=True`` and an
  allow-list of the few non-tensor types its checkpoints hold.

Every rank calls these functions (ZeRO-3 gathers partitioned weights collectively; each rank
writes its own shard); rank 0 writes the shared files. Writes are atomic: everything goes to
a temporary sibling folder that is renamed into place once all ranks are done, so a reader
sees the old folder or the new one, never a half-written one. The folder must be on storage
every rank sees (a shared file system on a multi-node cluster).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
TRAINER_STATE = "trainer_state.json"
DS_TAG = "engine"


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def _barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


def _broadcast_str(s: str) -> str:
    d = _dist()
    if not d:
        return s
    box = [s]
    d.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``folder`` (the same on every rank); after the block and a
    barrier, rank 0 swaps it into place. Collective: every rank enters."""
    folder = Path(folder)
    tmp = folder.parent / _broadcast_str(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    if _rank() == 0:
        tmp.mkdir(parents=True)
    _barrier()
    try:
        yield tmp
        _barrier()
        if _rank() == 0:
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            if folder.exists():
                os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if _rank() == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()


def _unwrap(model) -> nn.Module:
    return getattr(model, "module", model)


@contextlib.contextmanager
def _gathered(params: list[nn.Parameter]):
    """Full tensors of ZeRO-3 partitioned ``params`` inside the block (collective)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """The LoRA weights of the transformer (or engine), in the diffusers/peft key format,
    fp32 on CPU. Collective under ZeRO-3."""
    from peft.utils import get_peft_model_state_dict

    module = _unwrap(model)
    params = [p for n, p in module.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError("the transformer has no LoRA adapters to export (finetune.mode=full?)")
    with _gathered(params):
        sd = get_peft_model_state_dict(module)
        return {k: v.detach().float().cpu().contiguous().clone() for k, v in sd.items()}


def export_lora(model, folder: str | os.PathLike) -> Path:
    """Write the LoRA adapters to ``folder`` in the diffusers format (collective)."""
    from diffusers import StableDiffusion3Pipeline

    module = _unwrap(model)
    sd = lora_state_dict(model)
    metadata = module.peft_config["default"].to_dict()
    with atomic_folder(folder) as tmp:
        if _rank() == 0:
            StableDiffusion3Pipeline.save_lora_weights(
                tmp,
                transformer_lora_layers=sd,
                transformer_lora_adapter_metadata=metadata,
                weight_name=LORA_WEIGHTS,
            )
    return Path(folder)


def export_transformer(model, folder: str | os.PathLike) -> Path:
    """Write the whole (fully fine-tuned) transformer as a diffusers folder (collective)."""
    module = _unwrap(model)
    params = list(module.parameters())
    with _gathered(params), atomic_folder(folder) as tmp:
        if _rank() == 0:
            module.save_pretrained(tmp, safe_serialization=True)
    return Path(folder)


def export_policy(model, folder: str | os.PathLike, finetune_mode: str) -> Path:
    """LoRA export for ``lora``, the transformer folder for ``full``."""
    if finetune_mode == "lora":
        return export_lora(model, folder)
    return export_transformer(model, folder)


# --------------------------------------------------------------------------- resume bundle


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    kind, keys, pos, has_gauss, g = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, g))


def save_resume(engine, folder: str | os.PathLike, step: int, state: dict | None = None) -> Path:
    """Write the resume bundle of a DeepSpeed ``engine`` at ``step`` (collective).

    ``state``: JSON-able extras (data position, best score, ...), stored with the step.
    """
    from safetensors.torch import save_file

    rank = _rank()
    with atomic_folder(folder) as tmp:
        # Trainable state only: a LoRA run's frozen base (16 GB for SD3.5-Large) comes back
        # from generator.model on resume, not from every checkpoint.
        # Nor the fixed positional table (432 MiB for SD3.5-Medium), rebuilt at construction.
        with without_fixed_buffers(engine.module):
            engine.save_checkpoint(
                str(tmp / "deepspeed"),
                tag=DS_TAG,
                save_latest=False,
                exclude_frozen_parameters=True,
            )
        tensors, meta = _rng_state()
        (tmp / "rng").mkdir(exist_ok=True)
        save_file(tensors, str(tmp / "rng" / f"rank{rank}.safetensors"))
        (tmp / "rng" / f"rank{rank}.json").write_text(json.dumps(meta))
        if rank == 0:
            doc = {"format": 1, "step": int(step), "state": state or {}}
            (tmp / TRAINER_STATE).write_text(json.dumps(doc, indent=2))
    return Path(folder)


def load_resume(engine, folder: str | os.PathLike) -> tuple[int, dict]:
    """Restore a bundle written by :func:`save_resume` into ``engine`` (same world size and
    ZeRO stage) and this rank's RNGs; returns ``(step, state)``. Collective."""
    from safetensors.torch import load_file

    folder = Path(folder)
    doc_path = folder / TRAINER_STATE
    if not doc_path.is_file():
        raise FileNotFoundError(f"{folder} is not a resume bundle (no {TRAINER_STATE})")
    doc = json.loads(doc_path.read_text())
    load_deepspeed_checkpoint(engine, folder / "deepspeed", DS_TAG)
    rank = _rank()
    rng_file = folder / "rng" / f"rank{rank}.safetensors"
    if rng_file.is_file():
        meta = json.loads((folder / "rng" / f"rank{rank}.json").read_text())
        _set_rng_state(load_file(str(rng_file)), meta)
    return int(doc["step"]), dict(doc.get("state", {}))


def load_deepspeed_checkpoint(engine, folder: str | os.PathLike, tag: str) -> None:
    """``engine.load_checkpoint(folder, tag)`` with ``torch.load(weights_only=True)``:
    DeepSpeed's own loader unpickles arbitrary objects. Collective."""
    previous = engine.checkpoint_engine
    engine.checkpoint_engine = _safe_checkpoint_engine(engine)
    try:
        path, _ = engine.load_checkpoint(str(folder), tag=tag, custom_load_fn=load_trainable)
    finally:
        engine.checkpoint_engine = previous
    if path is None:
        raise FileNotFoundError(f"{folder}: DeepSpeed found no checkpoint {tag!r} to load")


def _fixed_buffers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, owner)`` of the buffers that construction rebuilds from the config
    and training never changes: the sin-cos positional table of diffusers' ``PatchEmbed``,
    persistent in SD3 (``pos_embed_max_size``) though it is a function of the config."""
    from diffusers.models.embeddings import PatchEmbed

    return [
        (f"{name}.pos_embed" if name else "pos_embed", m)
        for name, m in module.named_modules()
        if isinstance(m, PatchEmbed) and m._buffers.get("pos_embed") is not None
    ]


@contextlib.contextmanager
def without_fixed_buffers(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module.state_dict()`` leaves out :func:`_fixed_buffers`."""
    marked = []
    for _, m in _fixed_buffers(module):
        if "pos_embed" not in m._non_persistent_buffers_set:
            m._non_persistent_buffers_set.add("pos_embed")
            marked.append(m)
    try:
        yield
    finally:
        for m in marked:
            m._non_persistent_buffers_set.discard("pos_embed")


def load_trainable(src: dict, dst: torch.nn.Module) -> None:
    """Load a module state saved without its frozen parameters: every trainable parameter
    and buffer of ``dst`` must be in ``src``, and nothing else may be (a checkpoint of another
    model, rank or adapter fails here, naming the keys). A state that holds the frozen
    parameters too (older bundles) loads them as well; the fixed positional table may be
    absent (see :func:`without_fixed_buffers`)."""
    frozen = {n for n, p in dst.named_parameters() if not p.requires_grad}
    frozen |= {n for n, _ in _fixed_buffers(dst)}
    result = dst.load_state_dict(src, strict=False)
    missing = sorted(set(result.missing_keys) - frozen)
    if missing or result.unexpected_keys:
        raise ValueError(
            "the checkpoint does not match the model: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {sorted(result.unexpected_keys)[:5]} ({len(result.unexpected_keys)})"
        )


def _safe_checkpoint_engine(engine):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine(engine._config)


def _deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed writes into its checkpoints (plain data classes)."""
    out = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler

        out.append(LossScaler)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        out.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        out.append(fragment_address)
    except ImportError:
        pass
    return out
