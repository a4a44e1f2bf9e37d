"""Flow-matching pretraining of the world's tiny SD3 transformer (:mod:`rlhf.world.sd3` holds
its configuration, the VAE and the pipeline).

Training follows SD3's recipe at toy size: latents ``(z - shift) * scale`` from the frozen VAE,
``x_t = (1 - t) x_0 + t ε`` with ``t`` logit-normal, the transformer regresses ``ε - x_0``;
10% of captions are dropped to the empty prompt so classifier-free guidance works. Options the
world's pilots measured (BENCHMARKS.md section 0): object-weighted errors, trained text
encoders, contrastive flow matching and representation alignment.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rlhf.world.sd3 import _caption_rows, _cosine, _encode, _encode_captions, _tokenize, text_states


def train_transformer(
    pipe,
    latents: torch.Tensor,
    captions: list[str],
    steps: int,
    batch_size: int = 32,
    lr: float = 5e-4,
    drop_caption: float = 0.1,
    max_sequence_length: int = 1,
    seed: int = 0,
    progress: bool = True,
    weights: torch.Tensor | None = None,
    t_mean: float = 0.0,
    text_lr: float = 0.0,
    contrastive: float = 0.0,
    align: torch.Tensor | None = None,
    align_weight: float = 0.5,
    align_block: int = 1,
    weight_below: float = 1.0,
    pair_weight: float = 0.0,
    precision: str = "fp32",
):
    """Flow-matching pretraining of ``pipe.transformer`` on scaled ``latents (N, 4, h, w)``
    (16x16 from the factor-4 VAE) and their ``captions`` (see the module docstring);
    ``weights (N, 1, h, w)`` weigh each latent pixel's squared error (:func:`latent_weights`)
    at timesteps below ``weight_below`` (above it every pixel counts once: a weight that
    depends on the clean image biases the regression toward what it weighs, and where the
    layout is still open that means extra objects); timesteps are logit-normal with mean
    ``t_mean`` (above 0: more of them noisy, where layout and shape are decided). With
    ``text_lr`` above 0 the two text encoders train too, at that learning rate (each starts as
    the world CLIP's text tower; frozen, it separates shape and number words too little for the
    transformer to follow them). ``contrastive`` above 0 subtracts that multiple of the squared
    distance to another sample's target (contrastive flow matching, Stoica et al. 2025, whose
    ImageNet runs use 0.05). ``align (N, tokens, C)``: a pretrained encoder's features of each
    clean image on the transformer's token grid (:func:`clip_token_features`); the image tokens
    after block ``align_block``, through a small projector trained alongside (and dropped),
    are pulled toward them by ``align_weight`` times their negative cosine similarity
    (representation alignment, REPA, Yu et al. 2024, whose weight is 0.5). ``pair_weight``
    above 0: ``latents`` come in twins (rows 2i and 2i + 1: the same scene but for one word of
    the caption, e.g. the shape); a batch holds whole twins under the same t and noise, and
    the loss adds that multiple of the squared difference of the twins' residuals, i.e. the
    error of the predicted *difference* the word makes (a pilot, BENCHMARKS.md section 0).
    ``precision``: the forward passes' arithmetic (:mod:`rewards.world.precision`). Returns
    the per-step losses."""
    from tqdm import tqdm

    from rewards.world.precision import training_autocast

    torch.manual_seed(seed)
    model = pipe.transformer
    model.train().requires_grad_(True)
    aligner = _Aligner(model, align, align_weight, align_block) if align is not None else None
    groups = [
        {"params": list(model.parameters()) + (aligner.params() if aligner else []), "lr": lr}
    ]
    conditions = _Conditions(pipe, captions, max_sequence_length, trained=text_lr > 0)
    if text_lr > 0:
        groups.append({"params": conditions.params(), "lr": text_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.99))
    sched = _cosine(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc="world-sd3", disable=not progress, mininterval=5)
    k = 2 if pair_weight > 0 else 1  # samples per group: whole twins share one t and noise
    try:
        for _ in bar:
            first = k * torch.randint(0, len(latents) // k, (batch_size // k,), generator=gen)
            idx = (first[:, None] + torch.arange(k)).flatten()
            x0 = latents[idx]
            drop = torch.rand(len(idx), generator=gen) < drop_caption
            n = len(idx) // k
            t = torch.sigmoid(t_mean + torch.randn(n, generator=gen))  # logit-normal
            t = t.repeat_interleave(k)
            noise = torch.randn((n, *x0.shape[1:]), generator=gen).repeat_interleave(k, dim=0)
            w = None
            if weights is not None:
                w = weights[idx]
                if weight_below < 1.0:
                    w = torch.where(t[:, None, None, None] < weight_below, w, torch.ones_like(w))
            with training_autocast(precision):
                e, p = conditions(idx, drop)
                err, residual = _flow_errors(model, x0, noise, t, e, p, contrastive, w)
            loss = err.mean() + (aligner.loss(idx) if aligner else 0.0)
            if pair_weight > 0:
                loss = loss + pair_weight * (residual[0::2] - residual[1::2]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([q for g in groups for q in g["params"]], 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
    finally:
        if aligner:
            aligner.remove()
        model.eval().requires_grad_(False)
        conditions.freeze()
    return losses


def _flow_errors(model, x0, noise, t, embeds, pooled, contrastive: float, weights):
    """``(errors, residual)``: the per-element squared error of ``model``'s velocity at
    ``x_t = (1 - t) x0 + t noise`` against ``noise - x0``, less ``contrastive`` times the error
    against another sample's target (contrastive flow matching), times ``weights`` where
    given; and the plain residual ``velocity - target``."""
    tt = t[:, None, None, None]
    xt = (1 - tt) * x0 + tt * noise
    v = model(
        hidden_states=xt, timestep=t * 1000, encoder_hidden_states=embeds, pooled_projections=pooled
    ).sample.float()
    target = noise - x0
    err = (v - target).pow(2)
    if contrastive > 0:
        # Away from another sample's target (a batch roll), so that flows under different
        # captions stay apart.
        err = err - contrastive * (v - target.roll(1, dims=0)).pow(2)
    return (err * weights if weights is not None else err), v - target


class _Conditions:
    """The text conditioning of each training sample: ``(embeds, pooled)`` of its caption, or of
    the empty prompt where the caption is dropped. Frozen encoders encode each distinct caption
    once; ``trained`` ones encode the batch's token ids every step, with gradients."""

    def __init__(self, pipe, captions: list[str], max_sequence_length: int, trained: bool):
        self.pipe, self.msl, self.trained = pipe, max_sequence_length, trained
        self.encoders = (pipe.text_encoder, pipe.text_encoder_2)
        if trained:
            for enc in self.encoders:
                enc.train().requires_grad_(True)
            distinct, self.row = _caption_rows(captions)
            self.ids = _tokenize(pipe, distinct + [""])
            self.empty_row = len(distinct)
        else:
            self.empty = _encode(pipe, [""], max_sequence_length)
            self.embeds, self.pooled, self.row = _encode_captions(
                pipe, captions, max_sequence_length
            )

    def params(self) -> list:
        return [p for e in self.encoders for p in e.parameters()]

    def __call__(self, idx: torch.Tensor, drop: torch.Tensor):
        if self.trained:
            rows = torch.where(drop, self.empty_row, self.row[idx])
            return text_states(self.pipe, self.ids[rows], self.msl)
        (empty_e, empty_p), rows = self.empty, self.row[idx]
        e = torch.where(drop[:, None, None], empty_e, self.embeds[rows])
        return e, torch.where(drop[:, None], empty_p, self.pooled[rows])

    def freeze(self) -> None:
        for enc in self.encoders:
            enc.eval().requires_grad_(False)


class _Aligner:
    """Representation alignment (see :func:`train_transformer`): a projector of the image
    tokens after ``block`` and the weighted negative cosine similarity to ``targets[idx]``."""

    def __init__(self, model, targets: torch.Tensor, weight: float, block: int):
        width = model.config.num_attention_heads * model.config.attention_head_dim
        self.projector = torch.nn.Sequential(
            torch.nn.Linear(width, 2 * width),
            torch.nn.SiLU(),
            torch.nn.Linear(2 * width, targets.shape[-1]),
        )
        self.targets, self.weight, self.tokens = targets, weight, {}
        self.hook = model.transformer_blocks[block].register_forward_hook(
            lambda _m, _i, out: self.tokens.__setitem__("h", out[1])
        )

    def params(self) -> list:
        return list(self.projector.parameters())

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.projector(self.tokens.pop("h").float())  # bf16 under training_autocast
        return -self.weight * F.cosine_similarity(h, self.targets[idx], dim=-1).mean()

    def remove(self) -> None:
        self.hook.remove()


@torch.no_grad()
def clip_token_features(
    clip_model, images: np.ndarray, grid: int, stage: int = 3, batch: int = 256
):
    """``(N, grid * grid, C)``: the world CLIP's ResNet image features after residual stage
    ``stage`` (1-4: 16, 8, 4, 2 px cells of a 64 px image) of uint8 ``images (N, 64, 64, 3)``,
    resized to the transformer's ``grid x grid`` tokens, in their row-major order (the targets
    of :func:`train_transformer`'s ``align``)."""
    from rewards.world.clip import pixels

    visual = clip_model.visual
    if not hasattr(visual, "layer4") or not 1 <= stage <= 4:
        raise ValueError(
            f"align stage={stage}: needs 1-4 and the world CLIP's ResNet image tower "
            "(clip_vision: resnet)"
        )
    out = []
    for i in range(0, len(images), batch):
        x = visual.stem(pixels(images[i : i + batch]))
        for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4)[:stage]:
            x = layer(x)
        x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)
        out.append(x.flatten(2).transpose(1, 2))
    return torch.cat(out)


def latent_weights(
    cover: np.ndarray | None, object_weight: float, factor: int = 4
) -> torch.Tensor | None:
    """``(N, 1, H/factor, W/factor)`` loss weights from object coverage ``cover (N, H, W)``:
    ``1 + object_weight * coverage`` of each latent pixel, scaled to mean 1 over the data.
    Objects cover about a tenth of a render, so an unweighted loss spends most of its signal
    on the backdrop and barely any on what tells a circle from a square. ``object_weight``
    0: None (every pixel counts once, as :func:`train_transformer` takes ``weights=None``;
    ``cover`` is then not needed)."""
    if not object_weight:
        return None
    c = F.avg_pool2d(torch.as_tensor(cover)[:, None], factor)
    w = 1.0 + object_weight * c
    return w / w.mean()
