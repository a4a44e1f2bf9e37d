"""Our ImageReward against the reference package (``image-reward`` 1.5), once, at full size.

Two steps in two environments (the reference pins old timm/fairscale/transformers):

    # 1. in a venv with image-reward 1.5 (see BENCHMARKS.md): build the reference model with
    #    random weights, save its state dict, score images and prompts
    python bench/imagereward_reference.py reference --out /tmp/irref
    # 2. in the project's venv: load that state dict into ours through the key map, strictly,
    #    score the same inputs, compare
    python bench/imagereward_reference.py ours --out /tmp/irref

Nothing is downloaded: ``init_tokenizer`` of the reference reads ``bert-base-uncased`` from
the working folder, where step 1 writes a WordPiece vocabulary of BERT's layout (30522
entries, specials at BERT's ids; the words are ours), which step 2 loads as our tokenizer
too, so the token ids of both sides are compared as well. Only the reference's package
``__init__`` (which imports its ReFL trainer and ``datasets``) is skipped; its model code runs
as shipped.
"""

from __future__ import annotations

import argparse
import json
import os
import string
import sys
from pathlib import Path

import torch

PROMPTS = [
    "a red circle on the left of a blue square",
    "a photo of a cat sitting on a golden chair, dramatic side lighting",
    "two green triangles",
    "an astronaut riding a horse on the moon, highly detailed, 4k",
    "",
    "a very long prompt " + "with many many words " * 12,
]
N_IMAGES = len(PROMPTS)
WORDS = """a an the of and with on in at to is are one two three red green blue yellow
white black golden circle square triangle photo cat dog sitting chair dramatic side
lighting astronaut riding horse moon highly detailed very long prompt many words left
right""".split()


def write_vocab(folder: Path) -> None:
    """A 30522-entry WordPiece vocab laid out as bert-base-uncased's: [PAD] 0, [UNK] 100,
    [CLS] 101, [SEP] 102, [MASK] 103."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)]
    vocab += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab += [w for w in dict.fromkeys(WORDS) if w not in vocab]
    vocab += [f"[unused{i}]" for i in range(99, 99 + 30522 - len(vocab))]
    assert len(vocab) == 30522
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")


def make_images(seed: int = 0) -> torch.Tensor:
    """``(N, 3, 224, 224)`` in [0, 1]: smooth colour fields plus noise, each different."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 224), torch.linspace(0, 1, 224), indexing="ij")
    out = []
    for _ in range(N_IMAGES):
        f = torch.rand(3, 4, generator=g) * 6
        base = torch.stack([torch.sin(f[c, 0] * xx + f[c, 1] * yy + f[c, 2]) for c in range(3)])
        out.append((0.5 + 0.35 * base + 0.15 * torch.rand(3, 224, 224, generator=g)).clamp(0, 1))
    return torch.stack(out)


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    return (images - mean) / std


def run_reference(out: Path) -> None:
    import importlib.util
    import types

    spec = importlib.util.find_spec("ImageReward")
    pkg = types.ModuleType("ImageReward")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["ImageReward"] = pkg  # skip the package __init__ (ReFL, datasets)
    from ImageReward.ImageReward import ImageReward

    write_vocab(out / "bert-base-uncased")
    med = json.loads((Path(__file__).parent / "imagereward_med_config.json").read_text())
    (out / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(0)
    os.chdir(out)  # init_tokenizer reads ./bert-base-uncased
    model = ImageReward(med_config=str(out / "med_config.json"), device="cpu").eval()
    with torch.no_grad():
        # The released head's init (std 1/769) makes random scores all but equal; widen it so
        # that the comparison sees spread.
        for name, p in model.mlp.named_parameters():
            if name.endswith("weight"):
                p.normal_(0, p.shape[1] ** -0.5)
    torch.save(model.state_dict(), out / "ImageReward.pt")
    tok = model.blip.tokenizer(
        PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    images = make_images()
    with torch.no_grad():
        scores = model.score_gard(tok.input_ids, tok.attention_mask, normalise(images))
    torch.save(
        {
            "images": images,
            "input_ids": tok.input_ids,
            "attention_mask": tok.attention_mask,
            "scores": scores.squeeze(-1),
            "versions": {"torch": str(torch.__version__), "transformers": _version("transformers")},
        },
        out / "reference_scores.pt",
    )
    print(f"reference scores: {scores.squeeze(-1).tolist()}")


def _version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)


def run_ours(out: Path) -> dict:
    from rewards.registry import build_reward

    ref = torch.load(out / "reference_scores.pt", weights_only=True)
    model = build_reward(
        {
            "name": "imagereward",
            "checkpoint": str(out / "ImageReward.pt"),
            "options": {"tokenizer": str(out / "bert-base-uncased")},
        }
    )
    ids, mask = model.tokenize(PROMPTS, "cpu")
    ids_equal = torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    with torch.no_grad():
        ours = (model.head_logits(normalise(ref["images"]), ids, mask) - 0.16717362830052426) / (
            1.0333394966054072
        )
        # The public path (images in [0, 1] at 224 px, prompts as text).
        public = model(ref["images"], PROMPTS)
    result = {
        "max_abs_diff": float((ours - ref["scores"]).abs().max()),
        "max_abs_diff_public_path": float((public - ref["scores"]).abs().max()),
        "score_std": float(ref["scores"].std()),
        "token_ids_equal": bool(ids_equal),
        "n": N_IMAGES,
        "reference": ref["versions"],
        "ours": {"torch": str(torch.__version__), "transformers": _version("transformers")},
    }
    print(json.dumps(result, indent=2))
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("side", choices=("reference", "ours"))
    p.add_argument("--out", type=Path, default=Path("/tmp/irref"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    (run_reference if a.side == "reference" else run_ours)(a.out)


if __name__ == "__main__":
    main()
