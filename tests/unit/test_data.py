import io
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from rewards.data import (
    TripletDataset,
    collate_triplets,
    convert_pickhigh,
    convert_to_parquet,
    read_pickhigh,
)

IMAGES = ("easy_image_0", "easy_image_1", "refine_image")


def _png(value: int, size: int = 16) -> bytes:
    """A flat grey PNG whose pixels all equal ``value``."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(value: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buf, format="JPEG")
    return buf.getvalue()


def _frame(n: int = 4, labels: bool = True) -> pd.DataFrame:
    rows = []
    for i in range(n):
        row = {
            "easy_prompt": f"easy {i}",
            "refine_prompt": f"refined {i}",
            "easy_image_0": _png(10 * i),
            "easy_image_1": _png(10 * i + 1),
            "refine_image": _png(10 * i + 2),
        }
        if labels:
            # E2 != R1 in every row, so reading E2 from R1 (the reference bug) shows.
            row.update({"E1": 0.1 + i, "E2": 0.2 + i, "R1": 0.3 + i, "R2": 0.4 + i})
        rows.append(row)
    return pd.DataFrame(rows)


def _pixel(images: torch.Tensor) -> list[int]:
    """The grey level of each of the 3 images, ``images (3, 3, S, S)``."""
    return [round(float(images[k].mean()) * 255) for k in range(3)]


def test_bytes_columns_from_parquet(tmp_path):
    path = tmp_path / "t.parquet"
    _frame().to_parquet(path)
    ds = TripletDataset(path, image_size=8)
    assert len(ds) == 4
    item = ds[2]
    assert item["easy_prompt"] == "easy 2" and item["refine_prompt"] == "refined 2"
    assert item["images"].shape == (3, 3, 8, 8) and item["images"].dtype == torch.float32
    assert _pixel(item["images"]) == [20, 21, 22]  # order I1, I2, I3
    assert 0.0 <= item["images"].min() and item["images"].max() <= 1.0


def test_labels_read_from_their_own_columns():
    item = TripletDataset(_frame())[1]
    assert item["labels"].dtype == torch.float32
    torch.testing.assert_close(item["labels"], torch.tensor([1.1, 1.2, 1.3, 1.4]))


def test_labels_nan_when_absent():
    assert TripletDataset(_frame(labels=False))[0]["labels"].isnan().all()
    # Only some label columns, or an empty cell: NaN just there.
    frame = _frame().drop(columns=["R2"])
    frame.loc[0, "E1"] = None
    labels = TripletDataset(frame)[0]["labels"]
    assert math.isnan(labels[0]) and math.isnan(labels[3])
    torch.testing.assert_close(labels[1:3], torch.tensor([0.2, 0.3]))


def test_relative_and_absolute_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    frame = _frame(2)
    for i in range(2):
        for k, c in enumerate(IMAGES):
            name = f"imgs/{i}_{k}.jpg"
            (tmp_path / name).write_bytes(_jpeg(100 + 40 * k))
            # Row 1 holds absolute paths; they ignore image_root.
            frame.loc[i, c] = name if i == 0 else str(tmp_path / name)
    frame.to_parquet(tmp_path / "t.parquet")
    ds = TripletDataset(tmp_path / "t.parquet", image_root=tmp_path, image_size=16)
    for i in range(2):
        got = _pixel(ds[i]["images"])
        assert all(abs(g - e) <= 2 for g, e in zip(got, [100, 140, 180]))  # JPEG rounding
    assert ds.num_skipped == 0


def test_bad_rows_are_skipped_and_counted(tmp_path, caplog):
    frame = _frame(6)
    frame.at[1, "easy_image_1"] = b"not an image at all"
    frame.at[2, "refine_image"] = _png(5)[:40]  # truncated PNG
    frame.at[3, "refine_prompt"] = ""
    frame.at[4, "easy_prompt"] = None
    path = tmp_path / "t.parquet"
    frame.to_parquet(path)
    ds = TripletDataset(path, image_size=8)
    with caplog.at_level(logging.WARNING, logger="rewards.data"):
        assert ds[1] is None and ds[1] is None
    assert ds.num_skipped == 1
    assert len([r for r in caplog.records if "triplet 1" in r.getMessage()]) == 1

    loader = DataLoader(ds, batch_size=4, shuffle=False, collate_fn=collate_triplets)
    batches = list(loader)
    assert [b["images"].shape[0] for b in batches] == [1, 1]
    assert [p for b in batches for p in b["easy_prompt"]] == ["easy 0", "easy 5"]
    assert batches[0]["images"].shape == (1, 3, 3, 8, 8)
    assert batches[0]["labels"].shape == (1, 4)
    assert ds.num_skipped == 4
    assert TripletDataset(path, image_size=8).scan() == 4


def test_missing_file_row_is_skipped(tmp_path):
    frame = _frame(3)
    frame["easy_image_0"] = ["a.png", "gone.png", "c.png"]
    for name in ("a.png", "c.png"):
        (tmp_path / name).write_bytes(_png(7))
    ds = TripletDataset(frame, image_root=tmp_path, image_size=8)
    assert ds[1] is None
    assert ds.scan() == 1 and ds.num_skipped == 1
    batch = collate_triplets([ds[i] for i in range(3)])
    assert batch["easy_prompt"] == ["easy 0", "easy 2"]
    assert batch["images"].shape == (2, 3, 3, 8, 8)


def test_collate_all_bad():
    batch = collate_triplets([None, None])
    assert batch["easy_prompt"] == [] and batch["images"].shape[0] == 0
    assert batch["labels"].shape == (0, 4)


def test_missing_column_names_it(tmp_path):
    path = tmp_path / "t.parquet"
    _frame().drop(columns=["refine_image", "refine_prompt"]).to_parquet(path)
    with pytest.raises(ValueError, match="refine_prompt, refine_image") as e:
        TripletDataset(path)
    assert str(path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        TripletDataset(tmp_path / "nope.parquet")


@pytest.fixture
def pickhigh(tmp_path):
    """A tiny Pick-High release: a pickled frame of file names plus the image folders."""
    root = tmp_path / "pickhigh"
    easy, ref = root / "pick_easy_img" / "test", root / "pick_refine_img" / "test"
    easy.mkdir(parents=True)
    ref.mkdir(parents=True)
    rows = []
    for i in range(4):
        (easy / f"{i}_0.png").write_bytes(_png(10 * i))
        (easy / f"{i}_1.jpg").write_bytes(_jpeg(10 * i + 100))
        (ref / f"{i}.png").write_bytes(_png(10 * i + 2))
        rows.append(
            {
                "easy_prompt": f"easy {i}",
                "refine_prompt": f"refined {i}",
                "easy_image_0": f"{i}_0.png",
                "easy_image_1": f"{i}_1.jpg",
                "refine_image": f"{i}.png",
                "E1": 0.1 * i,
                "E2": 0.5,
                "R1": 0.25,
                "R2": 0.9,
            }
        )
    (ref / "3.png").unlink()  # row 3: a missing image
    (easy / "2_0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # row 2: corrupt
    pkl = tmp_path / "test.pkl"
    pd.DataFrame(rows).to_pickle(pkl)
    return pkl, root


def test_read_pickhigh_needs_allow_pickle(pickhigh):
    pkl, root = pickhigh
    with pytest.raises(ValueError, match="allow_pickle") as e:
        read_pickhigh(pkl, root, "test")
    assert "--allow-pickle" in str(e.value)
    with pytest.raises(ValueError, match="allow_pickle"):
        convert_pickhigh(pkl, root, "test", pkl.parent / "out.parquet")
    assert not (pkl.parent / "out.parquet").exists()

    frame = read_pickhigh(pkl, root, "test", allow_pickle=True)
    assert len(frame) == 4
    assert frame.loc[1, "easy_image_1"] == str(root.resolve() / "pick_easy_img/test/1_1.jpg")
    assert frame.loc[1, "refine_image"] == str(root.resolve() / "pick_refine_img/test/1.png")


def test_convert_pickhigh_round_trip(pickhigh, tmp_path):
    pkl, root = pickhigh
    out = tmp_path / "out" / "test.parquet"
    counts = convert_pickhigh(pkl, root, "test", out, allow_pickle=True)
    assert counts == {"written": 2, "skipped": 2}
    assert sorted(p.name for p in out.parent.iterdir()) == ["test.parquet"]
    ds = TripletDataset(out, image_size=8)
    assert len(ds) == 2 and ds.scan() == 0
    item = ds[1]
    assert item["easy_prompt"] == "easy 1"
    got = _pixel(item["images"])
    assert got[0] == 10 and abs(got[1] - 110) <= 2 and got[2] == 12
    torch.testing.assert_close(item["labels"], torch.tensor([0.1, 0.5, 0.25, 0.9]))

    # Paths kept instead of bytes: the same rows, read through the absolute paths.
    out2 = tmp_path / "paths.parquet"
    counts = convert_pickhigh(pkl, root, "test", out2, allow_pickle=True, embed_images=False)
    assert counts == {"written": 2, "skipped": 2}
    frame = pd.read_parquet(out2)
    assert frame["refine_image"].tolist() == [
        str(root.resolve() / f"pick_refine_img/test/{i}.png") for i in (0, 1)
    ]
    ds2 = TripletDataset(out2, image_size=8)
    np.testing.assert_array_equal(ds2[1]["images"].numpy(), item["images"].numpy())


def test_convert_to_parquet_from_bytes_frame(tmp_path):
    frame = _frame(3)
    frame.at[0, "easy_image_0"] = b"junk"
    counts = convert_to_parquet(frame, tmp_path / "c.parquet")
    assert counts == {"written": 2, "skipped": 1}
    ds = TripletDataset(tmp_path / "c.parquet", image_size=8)
    assert [ds[i]["easy_prompt"] for i in range(2)] == ["easy 1", "easy 2"]
    torch.testing.assert_close(ds[0]["labels"], torch.tensor([1.1, 1.2, 1.3, 1.4]))
