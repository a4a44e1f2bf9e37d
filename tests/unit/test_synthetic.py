import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from rewards.data import TripletDataset
from rewards.synthetic import COLUMNS, make_triplets, write_synthetic_parquet

IMAGES = ("easy_image_0", "easy_image_1", "refine_image")  # I1, I2, I3


def _decode(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), np.float32) / 255.0


@pytest.fixture(scope="module")
def triplets():
    """400 triplets decoded to ``(N, 3, S, S, 3)`` float arrays, plus the rows."""
    rows = make_triplets(400, seed=7, image_size=64)
    return rows, np.stack([[_decode(r[c]) for c in IMAGES] for r in rows])


def _accuracies(scores: np.ndarray) -> list[float]:
    """``scores (N, 3)`` -> strict accuracy of I2>I1, I3>I2, I3>I1."""
    return [
        float((scores[:, 1] > scores[:, 0]).mean()),
        float((scores[:, 2] > scores[:, 1]).mean()),
        float((scores[:, 2] > scores[:, 0]).mean()),
    ]


def _brightness(x):
    return x.mean(axis=(-1, -2, -3))


def _saturation(x):
    mx, mn = x.max(-1), x.min(-1)
    return ((mx - mn) / np.maximum(mx, 1e-6)).mean(axis=(-1, -2))


def _edges(x):
    g = x.mean(-1)
    return np.abs(np.diff(g, axis=-1)).mean(axis=(-1, -2)) + np.abs(np.diff(g, axis=-2)).mean(
        axis=(-1, -2)
    )


def test_columns_types_and_shapes():
    rows = make_triplets(3, seed=0, image_size=48)
    assert len(rows) == 3
    for r in rows:
        assert set(r) == set(COLUMNS)
        assert r["refine_prompt"].startswith(r["easy_prompt"] + ", with ")
        assert "background" in r["easy_prompt"]
        for c in IMAGES:
            im = Image.open(io.BytesIO(r[c]))
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (48, 48)


def test_too_small_image_size_is_refused():
    with pytest.raises(ValueError, match="image_size=8"):
        make_triplets(1, image_size=8)


def test_deterministic_by_seed():
    a, b = make_triplets(5, seed=3), make_triplets(5, seed=3)
    assert a == b
    c = make_triplets(5, seed=4)
    assert all(x[k] != y[k] for x, y in zip(a, c) for k in IMAGES)
    # Row i depends only on (seed, i).
    assert make_triplets(2, seed=3) == a[:2]


def test_three_images_differ():
    for r in make_triplets(20, seed=1):
        assert len({r[c] for c in IMAGES}) == 3


def test_trivial_scorers_do_not_solve_it(triplets):
    _, x = triplets
    for name, f in (("brightness", _brightness), ("saturation", _saturation), ("edges", _edges)):
        acc = _accuracies(f(x))
        assert max(acc) < 1.0, (name, acc)
        assert min(acc) > 0.0, (name, acc)
    # Brightness is near chance on every comparison, both ways round.
    assert all(0.35 < a < 0.65 for a in _accuracies(_brightness(x)))
    rng = np.random.default_rng(0)
    assert all(0.42 < a < 0.58 for a in _accuracies(rng.random((len(x), 3))))


def test_refined_image_has_measurable_detail(triplets):
    # Texture, rim light and decoration add structure: mean edge energy at 32 px is higher for
    # I3 than for I2 and I1, so the difference is learnable at the tiny model's resolution.
    rows, _ = triplets
    small = np.stack(
        [
            [
                np.asarray(
                    Image.open(io.BytesIO(r[c])).convert("RGB").resize((32, 32), Image.BICUBIC),
                    np.float32,
                )
                / 255.0
                for c in IMAGES
            ]
            for r in rows[:200]
        ]
    )
    e = _edges(small)
    assert e[:, 2].mean() > 1.3 * e[:, 1].mean()
    assert e[:, 2].mean() > 1.3 * e[:, 0].mean()
    assert _accuracies(e)[1] > 0.7


def test_parquet_round_trip(tmp_path):
    out = write_synthetic_parquet(tmp_path / "sub" / "syn.parquet", 6, seed=2, image_size=32)
    assert out == tmp_path / "sub" / "syn.parquet"
    assert [p.name for p in out.parent.iterdir()] == ["syn.parquet"]  # no temp file left
    frame = pd.read_parquet(out)
    assert list(frame.columns) == list(COLUMNS)
    rows = make_triplets(6, seed=2, image_size=32)
    assert frame["easy_image_1"].tolist() == [r["easy_image_1"] for r in rows]

    ds = TripletDataset(out, image_size=32)
    assert len(ds) == 6
    item = ds[4]
    assert item["easy_prompt"] == rows[4]["easy_prompt"]
    assert item["refine_prompt"] == rows[4]["refine_prompt"]
    assert item["images"].shape == (3, 3, 32, 32)
    expected = np.stack([_decode(rows[4][c]) for c in IMAGES]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(item["images"].numpy(), expected, atol=1e-6)
    assert item["labels"].isnan().all()
    assert ds.scan() == 0
