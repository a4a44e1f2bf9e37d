"""The world's tiny CLIP: an open_clip model (``world-clip``) with the world's own tokenizer
(:mod:`rewards.world.tokenizer`), pretrained contrastively on rendered (image, caption) pairs
with attribute-swapped hard negatives; its held-out caption-choice accuracy; and its text tower
as a transformers ``CLIPTextModelWithProjection`` (SD3's text-encoder slots).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rewards.backbones import tokenize
from rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess
from rewards.world import VISION_TOWERS
from rewards.world import scenes as S
from rewards.world.tokenizer import CONTEXT_LENGTH, build_tokenizer

log = logging.getLogger(__name__)

PERTURBATIONS = ("colour", "shape", "swap_colours", "count", "relation", "texture")


def model_config(vocab_size: int, scale: str = "full", vision: str = "vit") -> dict:
    """open_clip config of ``world-clip`` (``toy``: a smaller one for the CI build test).

    Sized for 2 CPU cores: a 2-block, 64-wide text tower (the world's language is small) and
    an image tower that is either a 3-block ViT over 8 px patches (``vit``, 64 tokens) or
    open_clip's ``ModifiedResNet`` (``resnet``: one bottleneck per stage, attention pool; the
    RN50 layout at width 16). At equal steps the ResNet separates shapes, textures and swapped
    colours far better (BENCHMARKS.md, section 0)."""
    vw, vl, tw, tl = (96, 3, 64, 2) if scale == "full" else (64, 2, 32, 1)
    if vision == "vit":
        vision_cfg = {
            "image_size": S.SIZE,
            "layers": vl,
            "width": vw,
            "head_width": 32,
            "patch_size": 8,
        }
    elif vision == "resnet":
        vision_cfg = {
            "image_size": S.SIZE,
            "layers": [1, 1, 1, 1],
            "width": 16 if scale == "full" else 8,
            "head_width": 16,
        }
    else:
        raise ValueError(f"vision={vision!r} must be one of {', '.join(VISION_TOWERS)}")
    return {
        "embed_dim": 64 if scale == "full" else 32,
        "vision_cfg": vision_cfg,
        "text_cfg": {
            "context_length": CONTEXT_LENGTH,
            "vocab_size": vocab_size,
            "width": tw,
            "heads": max(1, tw // 32),
            "layers": tl,
        },
    }


def create_model(config: dict):
    """An open_clip ``CLIP`` from a config dict (saved beside the weights as
    ``open_clip_config.json``, which a backbone spec names as its ``model``)."""
    from open_clip.model import CLIP

    return CLIP(**config)


# --------------------------------------------------------------------------- data


def perturb(scene: S.Scene, kind: str, rng: np.random.Generator) -> S.Scene | None:
    """``scene`` with one attribute changed (None where ``kind`` does not apply)."""
    objs = list(scene.objects)
    i = int(rng.integers(len(objs)))
    if kind == "colour":
        new = str(rng.choice([c for c in S.COLOURS if c != objs[i].colour]))
        objs[i] = replace(objs[i], colour=new)
    elif kind == "shape":
        objs[i] = replace(
            objs[i], shape=str(rng.choice([s for s in S.SHAPES if s != objs[i].shape]))
        )
    elif kind == "swap_colours":
        pairs = [
            (a, b)
            for a in range(len(objs))
            for b in range(a + 1, len(objs))
            if objs[a].colour != objs[b].colour and objs[a].shape != objs[b].shape
        ]
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        objs[a], objs[b] = (
            replace(objs[a], colour=objs[b].colour),
            replace(objs[b], colour=objs[a].colour),
        )
    elif kind == "count":
        if len(objs) >= 2 and rng.random() < 0.5:
            del objs[i]
        elif len(objs) < 4:
            objs.append(objs[i])
        else:
            return None
    elif kind == "relation":
        if len(objs) != 2:
            return None
        a, b = objs
        objs = [replace(a, y=b.y, x=b.x), replace(b, y=a.y, x=a.x)]
    elif kind == "texture":
        if scene.detail is None:
            return None
        tex = str(rng.choice([t for t in S.TEXTURES if t != scene.detail.texture]))
        return S.Scene(objs, scene.background, replace(scene.detail, texture=tex))
    return S.Scene(objs, scene.background, scene.detail)


def _caption(scene: S.Scene, seed) -> str:
    # The same template draw for a scene and its perturbations, so only the attribute differs.
    return S.describe(scene, np.random.default_rng(seed))


def negatives(scene: S.Scene, seed, rng: np.random.Generator, k: int) -> list[str]:
    """Up to ``k`` captions of perturbed copies of ``scene`` that differ from its own."""
    pos = _caption(scene, seed)
    out: list[str] = []
    for _ in range(8 * k):
        if len(out) == k:
            break
        alt = perturb(scene, str(rng.choice(PERTURBATIONS)), rng)
        if alt is None:
            continue
        cap = _caption(alt, seed)
        if cap != pos and cap not in out:
            out.append(cap)
    return out


def training_scene(rng: np.random.Generator) -> S.Scene:
    """One training scene: refined detail half the time; a prompt's scene (GenEval's
    categories) or a free random scene, half each."""
    detail = S.sample_detail(rng) if rng.random() < 0.5 else None
    if rng.random() < 0.5:
        return S.scene_for(S.sample_spec(rng), rng, detail)
    return S.random_scene(rng, detail)


def make_pairs(n: int, seed: int, k: int = 1) -> tuple[np.ndarray, list[str], list[list[str]]]:
    """``n`` renders ``(n, 64, 64, 3)`` uint8, their captions and ``k`` hard negatives each
    (the caption itself where fewer perturbations apply; it then only repeats a positive)."""
    images = np.empty((n, S.SIZE, S.SIZE, 3), np.uint8)
    pos, neg = [], []
    for i in range(n):
        rng = np.random.default_rng((seed, i))
        scene = training_scene(rng)
        images[i] = S.to_uint8(S.render(scene, rng, noise=float(rng.uniform(0, 0.03))))
        pos.append(_caption(scene, (seed, i, 1)))
        alt = negatives(scene, (seed, i, 1), rng, k)
        neg.append(alt + [pos[-1]] * (k - len(alt)))
    return images, pos, neg


def pixels(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> normalised CLIP pixels ``(B, 3, 64, 64)``."""
    x = torch.as_tensor(images_uint8).permute(0, 3, 1, 2).float() / 255.0
    return clip_preprocess(x, S.SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


# --------------------------------------------------------------------------- training


def train_clip(
    n_train: int = 24000,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    scale: str = "full",
    progress: bool = True,
    negatives_per_image: int = 3,
    vision: str = "vit",
    precision: str = "fp32",
):
    """Pretrain ``world-clip`` contrastively; returns ``(model, tokenizer, config)``.

    Each image is contrasted with every caption in the batch and with every caption's
    ``negatives_per_image`` hard negatives (NegCLIP's recipe), so attribute binding is what
    separates them. ``precision``: :mod:`rewards.world.precision`.
    """
    from tqdm import tqdm

    from rewards.world.precision import training_autocast

    torch.manual_seed(seed)
    tok = build_tokenizer()
    config = model_config(len(tok), scale, vision)
    model = create_model(config)
    t0 = time.time()
    k = negatives_per_image
    images, pos, neg = make_pairs(n_train, seed, k)
    pos_ids = tokenize(tok, pos)
    neg_ids = tokenize(tok, [c for row in neg for c in row]).view(n_train, k, -1)
    log.info("world-clip: %d pairs rendered in %.0f s", n_train, time.time() - t0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))),
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="world-clip", disable=not progress, mininterval=5)
    for _step in bar:
        idx = torch.randint(0, n_train, (batch_size,), generator=gen)
        with training_autocast(precision):
            img = model.encode_image(pixels(images[idx.numpy()]))
            txt = model.encode_text(torch.cat([pos_ids[idx], neg_ids[idx].flatten(0, 1)]))
        img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
        scale_ = model.logit_scale.exp().clamp(max=100)
        logits = scale_ * img @ txt.T  # (B, B + kB): own caption, others, every hard negative
        target = torch.arange(batch_size)
        loss = (
            F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :batch_size].T, target)
        ) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return model, tok, config


@torch.no_grad()
def caption_choice_accuracy(
    model, tokenizer, n: int = 1000, seed: int = 10_000, k: int = 4
) -> dict:
    """Held-out scenes: does the model score the true caption above each of up to ``k``
    attribute-swapped distractors? Returns overall and per-perturbation accuracy."""
    hits, per_kind = [], {kind: [] for kind in PERTURBATIONS}
    for i in range(n):
        rng = np.random.default_rng((seed, i))
        detail = S.sample_detail(rng) if rng.random() < 0.5 else None
        scene = (
            S.random_scene(rng, detail)
            if rng.random() < 0.5
            else S.scene_for(S.sample_spec(rng), rng, detail)
        )
        img = F.normalize(
            model.encode_image(pixels(S.to_uint8(S.render(scene, rng))[None])), dim=-1
        )
        pos = _caption(scene, (seed, i))
        kinds, caps = [], []
        for kind in PERTURBATIONS:
            alt = perturb(scene, kind, rng)
            if alt is None:
                continue
            cap = _caption(alt, (seed, i))
            if cap != pos:
                kinds.append(kind)
                caps.append(cap)
        if not caps:
            continue
        txt = F.normalize(model.encode_text(tokenize(tokenizer, [pos] + caps)), dim=-1)
        s = (img @ txt.T)[0]
        for kind, sc in zip(kinds, s[1:]):
            per_kind[kind].append(bool(s[0] > sc))
        order = np.random.default_rng((seed, i, 2)).permutation(len(caps))[:k]
        hits.append(bool(all(s[0] > s[1 + j] for j in order)))
    out = {"accuracy": float(np.mean(hits)), "n": len(hits)}
    out.update({f"vs_{k_}": float(np.mean(v)) for k_, v in per_kind.items() if v})
    return out


def save_clip(model, tokenizer, config: dict, folder: str | Path) -> Path:
    """``open_clip.safetensors``, ``open_clip_config.json`` and ``tokenizer/`` in ``folder``."""
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    return folder


def hf_text_encoder(model, tokenizer):
    """The text tower of an open_clip ``CLIP`` as a transformers
    ``CLIPTextModelWithProjection`` (what SD3's text-encoder slots hold), weights copied:
    ``text_embeds`` equals open_clip's ``encode_text`` for the same token ids."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    blocks = model.transformer.resblocks
    width = model.token_embedding.weight.shape[1]
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    cfg = CLIPTextConfig(
        vocab_size=model.token_embedding.weight.shape[0],
        hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        max_position_embeddings=model.positional_embedding.shape[0],
        projection_dim=model.text_projection.shape[1],
        hidden_act="gelu",
        layer_norm_eps=model.ln_final.eps,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=eot,
        pad_token_id=eot,
    )
    hf = CLIPTextModelWithProjection(cfg)
    sd = {
        "text_model.embeddings.token_embedding.weight": model.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": model.positional_embedding,
        "text_model.final_layer_norm.weight": model.ln_final.weight,
        "text_model.final_layer_norm.bias": model.ln_final.bias,
        "text_projection.weight": model.text_projection.T,
    }
    for i, b in enumerate(blocks):
        sd.update(_hf_block_state(b, f"text_model.encoder.layers.{i}."))
    missing, unexpected = hf.load_state_dict(
        {k: v.detach().clone().contiguous() for k, v in sd.items()}, strict=False
    )
    # position_ids is a buffer transformers fills itself.
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"text tower conversion: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def _hf_block_state(b, p: str) -> dict:
    """One open_clip residual block's weights under transformers' names, prefix ``p``."""
    q, k, v = b.attn.in_proj_weight.chunk(3)
    qb, kb, vb = b.attn.in_proj_bias.chunk(3)
    return {
        p + "self_attn.q_proj.weight": q,
        p + "self_attn.q_proj.bias": qb,
        p + "self_attn.k_proj.weight": k,
        p + "self_attn.k_proj.bias": kb,
        p + "self_attn.v_proj.weight": v,
        p + "self_attn.v_proj.bias": vb,
        p + "self_attn.out_proj.weight": b.attn.out_proj.weight,
        p + "self_attn.out_proj.bias": b.attn.out_proj.bias,
        p + "layer_norm1.weight": b.ln_1.weight,
        p + "layer_norm1.bias": b.ln_1.bias,
        p + "layer_norm2.weight": b.ln_2.weight,
        p + "layer_norm2.bias": b.ln_2.bias,
        p + "mlp.fc1.weight": b.mlp.c_fc.weight,
        p + "mlp.fc1.bias": b.mlp.c_fc.bias,
        p + "mlp.fc2.weight": b.mlp.c_proj.weight,
        p + "mlp.fc2.bias": b.mlp.c_proj.bias,
    }


def load_clip(folder: str | Path):
    """``(model, tokenizer)`` saved by :func:`save_clip`; weights read with safetensors and
    loaded strictly."""
    import json

    from transformers import CLIPTokenizer

    from rewards.checkpoints import load_state_dict_file, strict_load

    folder = Path(folder)
    model = create_model(json.loads((folder / "open_clip_config.json").read_text()))
    strict_load(model, load_state_dict_file(folder / "open_clip.safetensors"), what=str(folder))
    return model.eval(), CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
