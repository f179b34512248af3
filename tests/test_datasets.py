from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trojanlab.data import load_dataset, load_image_folder, load_npz, to_tensor
from trojanlab.data.datasets import EMBEDDED_GTSRB, EMBEDDED_GTSRB_SHA256
from trojanlab.errors import DataError

GTSRB5 = Path(__file__).parent / "data" / "gtsrb5"


def test_embedded_gtsrb_is_the_verified_file(gtsrb):
    assert hashlib.sha256(EMBEDDED_GTSRB.read_bytes()).hexdigest() == EMBEDDED_GTSRB_SHA256
    assert gtsrb.train.x.shape == (25087, 32, 32, 3) and gtsrb.test.x.shape == (5949, 32, 32, 3)
    assert gtsrb.num_classes == 43 and gtsrb.classes[14] == "stop"
    assert set(np.unique(gtsrb.test.y)) == set(range(43))


def test_npz_round_trip_and_test_only(tmp_path, small_npz):
    data = load_npz(small_npz)
    assert data.num_classes == 3 and len(data.train) == 300 and len(data.test) == 90
    np.savez(tmp_path / "eval.npz", x_test=data.test.x, y_test=data.test.y)
    only = load_dataset(str(tmp_path / "eval.npz"))
    assert only.train is None and len(only.test) == 90


def test_to_tensor_layout():
    x = np.zeros((2, 4, 5, 3), dtype=np.uint8)
    x[0, 1, 2, 0] = 255
    t = to_tensor(x)
    assert t.shape == (2, 3, 4, 5) and t[0, 0, 1, 2] == 1.0 and t.sum() == 1.0


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x_test": np.zeros((4, 8, 8, 3), np.float32), "y_test": np.zeros(4, np.int64)}, "uint8"),
        ({"x_test": np.zeros((4, 8, 8), np.uint8), "y_test": np.zeros(4, np.int64)}, "shape"),
        ({"x_test": np.zeros((4, 8, 8, 3), np.uint8), "y_test": np.zeros(3, np.int64)}, "3 labels for 4 images"),
        ({"x_test": np.zeros((4, 8, 8, 3), np.uint8), "y_test": np.array([0, 1, -1, 2])}, "negative label"),
        ({"x_test": np.zeros((4, 8, 8, 3), np.uint8)}, "needs arrays"),
        (
            {
                "x_train": np.zeros((4, 8, 8, 3), np.uint8),
                "x_test": np.zeros((4, 8, 8, 3), np.uint8),
                "y_test": np.zeros(4, np.int64),
            },
            "must come together",
        ),
    ],
)
def test_npz_errors_name_file_and_problem(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_npz(path)
    assert "bad.npz" in str(info.value)


def test_labels_out_of_range(tmp_path):
    path = tmp_path / "labels.npz"
    np.savez(path, x_test=np.zeros((2, 8, 8, 3), np.uint8), y_test=np.array([0, 5]))
    with pytest.raises(DataError, match="out of range for 3 classes"):
        load_npz(path, num_classes=3)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_npz(tmp_path / "nope.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(DataError, match="corrupt.npz: not a readable"):
        load_dataset(str(corrupt))
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset(str(tmp_path / "missing-folder"))


def test_real_image_folder():
    data = load_image_folder(GTSRB5, image_size=32, test_fraction=0.2, seed=0)
    assert data.classes == ["no_entry", "priority_road", "roundabout", "stop", "yield"]
    assert len(data.train) + len(data.test) == 550
    assert np.bincount(data.test.y).tolist() == [22] * 5
    assert data.train.x.shape[1:] == (32, 32, 3) and data.train.x.dtype == np.uint8
    again = load_image_folder(GTSRB5, image_size=32, test_fraction=0.2, seed=0)
    assert np.array_equal(again.test.x, data.test.x)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="cat: class folder is empty"):
        load_image_folder(tmp_path)
    (tmp_path / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no image files"):
        load_image_folder(tmp_path)
    Image.new("RGB", (10, 10)).save(tmp_path / "cat" / "a.png")
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        load_image_folder(tmp_path)


def test_torchvision_layout_missing_is_clear(tmp_path):
    with pytest.raises(DataError, match="torchvision's layout"):
        load_dataset(f"torchvision-gtsrb:{tmp_path}")


def test_torchvision_gtsrb_layout(tmp_path):
    """A miniature of the official release in torchvision's layout: 43 class folders of .ppm + the test CSV."""
    base = tmp_path / "gtsrb"
    rng = np.random.default_rng(0)
    for label in range(43):
        folder = base / "GTSRB" / "Training" / f"{label:05d}"
        folder.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / "00000_00000.ppm")
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, label in enumerate([14, 0, 42]):
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(test_dir / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;30;30;0;0;29;29;{label}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    data = load_dataset(str(tmp_path))
    assert data.name == "gtsrb-official" and data.num_classes == 43
    assert data.train.x.shape == (43, 32, 32, 3) and sorted(data.train.y.tolist()) == list(range(43))
    assert data.test.y.tolist() == [14, 0, 42] and data.test.x.shape == (3, 32, 32, 3)
    assert load_dataset(f"torchvision-gtsrb:{tmp_path}").test.y.tolist() == [14, 0, 42]
