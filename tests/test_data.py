import gzip
import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from cnnrepair.data import (
    DOWNLOADS,
    content_sha256,
    download_dataset,
    load_cifar_pickles,
    load_dataset,
    load_digits,
    load_idx_folder,
    load_image_folder,
    to_float,
)
from cnnrepair.errors import CnnRepairError


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_idx_folder(folder, n_train=12, n_test=5, size=6, gz=True, rng=None):
    rng = rng or np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    data["train-labels-idx1-ubyte"][:10] = np.arange(10)
    for name, arr in data.items():
        raw = _idx_bytes(arr)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return data


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_gzipped_or_not(tmp_path, gz):
    data = _write_idx_folder(tmp_path / "mnist", gz=gz)
    ds = load_idx_folder(tmp_path / "mnist")
    assert ds.x_train.shape == (12, 1, 6, 6) and ds.x_train.dtype == np.uint8
    np.testing.assert_array_equal(ds.x_train[:, 0], data["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.y_test, data["t10k-labels-idx1-ubyte"])
    assert ds.y_train.dtype == np.int64 and ds.classes == [str(i) for i in range(10)]


def test_idx_same_code_reads_fashion_mnist_layout_in_raw_subfolder(tmp_path):
    _write_idx_folder(tmp_path / "FashionMNIST" / "raw")
    ds = load_dataset("fashion-mnist", tmp_path / "FashionMNIST")
    assert ds.name == "fashion-mnist" and ds.x_test.shape == (5, 1, 6, 6)


def test_idx_truncated_file_names_file(tmp_path):
    _write_idx_folder(tmp_path / "m", gz=False)
    f = tmp_path / "m" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(CnnRepairError, match="train-images-idx3-ubyte.*truncated"):
        load_idx_folder(tmp_path / "m")


def test_idx_corrupt_gzip_and_missing_file(tmp_path):
    _write_idx_folder(tmp_path / "m")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(CnnRepairError, match="t10k-labels-idx1-ubyte.gz: corrupt gzip"):
        load_idx_folder(tmp_path / "m")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(CnnRepairError, match="missing t10k-labels-idx1-ubyte"):
        load_idx_folder(tmp_path / "m")


def test_idx_label_count_mismatch(tmp_path):
    _write_idx_folder(tmp_path / "m", gz=False)
    (tmp_path / "m" / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3)))
    with pytest.raises(CnnRepairError, match="5 images but 3 labels"):
        load_idx_folder(tmp_path / "m")


def _cifar_batches(rng):
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 4))}
    batches["batches.meta"] = {b"label_names": [c.encode() for c in "abcdefghij"]}
    return batches


def test_cifar_pickles_folder_and_canonical_tarball(tmp_path):
    rng = np.random.default_rng(1)
    batches = _cifar_batches(rng)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, obj in batches.items():
        (folder / name).write_bytes(pickle.dumps(obj))
    ds = load_cifar_pickles(tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(ds.x_train[0].reshape(-1), batches["data_batch_1"][b"data"][0])
    assert ds.classes == list("abcdefghij")
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    ds2 = load_dataset("cifar10", tar_path, cache=False)
    np.testing.assert_array_equal(ds2.x_test, ds.x_test)
    ds3 = load_dataset("cifar10", tmp_path, cache=False)  # a folder holding the downloaded tarball
    np.testing.assert_array_equal(ds3.x_train, ds.x_train)


def test_cifar_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))

    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CnnRepairError, match="data_batch_1: not a CIFAR-10 batch.*posix.system|data_batch_1: not a CIFAR-10 batch"):
        load_cifar_pickles(folder)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_tree(root, rgb=True, size=5):
    rng = np.random.default_rng(2)
    arrays = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (size, size, 3) if rgb else (size, size), dtype=np.uint8)
                (d / f"{i:04d}.png").write_bytes(_png(arr))
                arrays[f"{split}/{cls}/{i:04d}.png"] = arr
    return arrays


@pytest.mark.parametrize("rgb", [True, False])
def test_image_folder_directory(tmp_path, rgb):
    arrays = _write_tree(tmp_path / "tree", rgb=rgb)
    ds = load_image_folder(tmp_path / "tree")
    c = 3 if rgb else 1
    assert ds.x_train.shape == (6, c, 5, 5) and ds.x_test.shape == (4, c, 5, 5)
    assert ds.classes == ["cat", "dog"] and list(ds.y_train) == [0] * 3 + [1] * 3
    expected = arrays["train/dog/0000.png"]
    np.testing.assert_array_equal(ds.x_train[3], expected.transpose(2, 0, 1) if rgb else expected[None])


def test_image_folder_tarball_with_prefix_and_cache(tmp_path, monkeypatch):
    _write_tree(tmp_path / "tree")
    tar_path = tmp_path / "imgs.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(tmp_path / "tree", arcname="CIFAR-10-images")
    ds = load_image_folder(tar_path)
    ref = load_image_folder(tmp_path / "tree")
    np.testing.assert_array_equal(ds.x_train, ref.x_train)
    monkeypatch.setenv("CNNREPAIR_CACHE", str(tmp_path / "cache"))
    a = load_dataset("cifar10", tar_path)
    assert len(list((tmp_path / "cache").glob("cifar10-*.npz"))) == 1
    b = load_dataset("cifar10", tar_path)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.classes == b.classes == ["cat", "dog"]


def test_image_folder_errors(tmp_path):
    _write_tree(tmp_path / "tree")
    (tmp_path / "tree" / "test" / "cat" / "0009.png").write_bytes(_png(np.zeros((7, 7, 3), np.uint8)))
    with pytest.raises(CnnRepairError, match="0009.png: image is 7x7, others are 5x5"):
        load_image_folder(tmp_path / "tree")
    (tmp_path / "tree" / "test" / "cat" / "0009.png").write_bytes(b"garbage")
    with pytest.raises(CnnRepairError, match="0009.png: not a readable image"):
        load_image_folder(tmp_path / "tree")
    (tmp_path / "bad.tar.gz").write_bytes(b"nope")
    with pytest.raises(CnnRepairError, match="bad.tar.gz: not a readable tar archive"):
        load_image_folder(tmp_path / "bad.tar.gz")


def test_digits_embedded_default():
    ds = load_digits()
    assert ds.x_train.shape[1:] == (1, 8, 8) and ds.x_train.dtype == np.uint8
    assert len(ds.y_train) + len(ds.y_test) == 1797 and ds.x_train.max() == 255
    x = to_float(ds.x_test)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_missing_dataset_message(tmp_path):
    with pytest.raises(CnnRepairError, match="mnist dataset not found; pass --data-dir"):
        load_dataset("mnist", tmp_path / "nowhere")


def test_download_verifies_checksums_against_local_files(tmp_path):
    src = tmp_path / "mirror"
    _write_idx_folder(src)
    table = {f.name: (f.as_uri(), content_sha256(f)) for f in sorted(src.iterdir())}
    folder = download_dataset("mnist", tmp_path / "data", urls=table)
    ds = load_idx_folder(folder)
    assert ds.x_train.shape == (12, 1, 6, 6)
    bad = dict(table)
    name = next(iter(bad))
    bad[name] = (bad[name][0], "0" * 64)
    (folder / name).unlink()
    with pytest.raises(CnnRepairError, match="checksum mismatch"):
        download_dataset("mnist", tmp_path / "data", urls=bad)
    assert not (folder / name).exists() and not list(folder.glob(".*tmp*"))


def test_download_with_md5_of_the_served_file(tmp_path):
    import hashlib

    src = tmp_path / "cifar-10-python.tar.gz"
    src.write_bytes(b"pretend tarball")
    md5 = "md5:" + hashlib.md5(src.read_bytes()).hexdigest()
    folder = download_dataset("cifar10", tmp_path / "data", urls={src.name: (src.as_uri(), md5)})
    assert (folder / src.name).read_bytes() == b"pretend tarball"
    with pytest.raises(CnnRepairError, match="checksum mismatch"):
        download_dataset("cifar10", tmp_path / "other", urls={src.name: (src.as_uri(), "md5:" + "0" * 32)})


def test_download_checksums_match_real_mnist_when_present():
    from pathlib import Path

    shared = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"
    if not shared.is_dir():
        pytest.skip("real MNIST not present beside the checkout")
    for name, (_, sha) in DOWNLOADS["mnist"].items():
        assert hashlib.sha256(gzip.decompress((shared / name).read_bytes())).hexdigest() == sha


@pytest.mark.parametrize("name, first, last", [("fashion-mnist", "T-shirt/top", "Ankle boot"), ("kmnist", "o", "wo")])
def test_fashion_mnist_and_kmnist_carry_their_class_names(tmp_path, name, first, last):
    from cnnrepair.data import load_dataset
    from tests.test_data import _write_idx_folder

    _write_idx_folder(tmp_path / name, size=6)
    ds = load_dataset(name, tmp_path / name)
    assert ds.name == name and ds.classes[0] == first and ds.classes[-1] == last and len(ds.classes) == 10
