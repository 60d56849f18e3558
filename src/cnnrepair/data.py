"""Datasets behind one interface: IDX folders, CIFAR-10 pickles, image-folder trees, 8x8 digits.

Every loader returns a :class:`Dataset` of uint8 images shaped (N, C, H, W) with int64 labels and
class names, so models, attacks and repair never care where the pixels came from.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnrepair.errors import CnnRepairError
from cnnrepair.io import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DATASETS = ("digits", "mnist", "fashion-mnist", "kmnist", "cifar10")


@dataclass
class Dataset:
    """Train and test images (uint8, N x C x H x W), int64 labels and the class names."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    source: str = ""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> "Dataset":
        """A stratification-free random slice, for tests and quick looks."""
        rng = np.random.default_rng(seed)
        tr = np.sort(rng.permutation(len(self.y_train))[:n_train]) if n_train else slice(None)
        te = np.sort(rng.permutation(len(self.y_test))[:n_test]) if n_test else slice(None)
        return Dataset(self.name, self.x_train[tr], self.y_train[tr], self.x_test[te], self.y_test[te],
                       list(self.classes), self.source)


def to_float(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 tensors in [0, 1]."""
    t = torch.as_tensor(x)
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()


def _validate(ds: Dataset) -> Dataset:
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        if x.ndim != 4 or x.dtype != np.uint8:
            raise CnnRepairError(f"{ds.source}: {split} images must be uint8 N x C x H x W, got {x.dtype} {x.shape}")
        if len(x) != len(y):
            raise CnnRepairError(f"{ds.source}: {split} has {len(x)} images but {len(y)} labels; the files do not belong together")
        if len(y) and (y.min() < 0 or y.max() >= len(ds.classes)):
            raise CnnRepairError(f"{ds.source}: {split} labels outside 0..{len(ds.classes) - 1}; check the label file")
    if ds.x_train.shape[1:] != ds.x_test.shape[1:]:
        raise CnnRepairError(f"{ds.source}: train images {ds.x_train.shape[1:]} and test images {ds.x_test.shape[1:]} differ in shape")
    return ds


# --- embedded default -------------------------------------------------------------------------

def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), split stratified and seeded; needs no files."""
    from sklearn.datasets import load_digits as _sk_digits
    from sklearn.model_selection import train_test_split

    bunch = _sk_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(images, labels, test_size=test_fraction, random_state=seed, stratify=labels)
    return _validate(Dataset("digits", xtr, ytr, xte, yte, [str(i) for i in range(10)], "sklearn.datasets.load_digits"))


# --- IDX (MNIST, Fashion-MNIST, KMNIST) -------------------------------------------------------

def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise CnnRepairError(f"{path}: corrupt gzip file ({exc}); download it again") from None
    return raw


def parse_idx(raw: bytes, where: str = "IDX data") -> np.ndarray:
    """Parse an IDX file (unsigned-byte payload) into an array of its declared shape."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise CnnRepairError(f"{where}: not an IDX file (bad magic number); download it again")
    if raw[2] != 0x08:
        raise CnnRepairError(f"{where}: IDX element type 0x{raw[2]:02x} is not unsigned byte; only uint8 IDX files are supported")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CnnRepairError(f"{where}: truncated IDX header; download it again")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape)) if shape else 0
    if len(raw) - header != count:
        raise CnnRepairError(f"{where}: IDX payload has {len(raw) - header} bytes, header says {count}; the file is truncated or corrupt, download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    for base in (folder, folder / "raw"):
        for cand in (base / f"{stem}.gz", base / stem):
            if cand.is_file():
                return cand
    raise CnnRepairError(f"{folder}: missing {stem}[.gz]; put the four IDX files there (or run `cnnrepair download`)")


IDX_CLASSES: dict[str, list[str]] = {
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "kmnist": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],  # the hiragana of KMNIST's classmap.csv, romanised
}


def load_idx_folder(folder: Path | str, name: str = "mnist", classes: list[str] | None = None) -> Dataset:
    """Read the four standard IDX files (gzipped or not) from ``folder`` or ``folder/raw``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CnnRepairError(f"{folder}: dataset folder not found; pass --data-dir pointing to the IDX files")
    arrays = {}
    for key, stem in IDX_FILES.items():
        path = _find_idx(folder, stem)
        arrays[key] = parse_idx(_read_maybe_gzip(path), str(path))
    for key in ("train_images", "test_images"):
        if arrays[key].ndim != 3:
            raise CnnRepairError(f"{folder}: {IDX_FILES[key]} must hold N x H x W images, has shape {arrays[key].shape}")
    n_classes = int(max(arrays["train_labels"].max(), arrays["test_labels"].max())) + 1
    ds = Dataset(name, arrays["train_images"][:, None].copy(), arrays["train_labels"].astype(np.int64),
                 arrays["test_images"][:, None].copy(), arrays["test_labels"].astype(np.int64),
                 classes or IDX_CLASSES.get(name) or [str(i) for i in range(n_classes)], str(folder))
    return _validate(ds)


# --- CIFAR-10 python pickles ------------------------------------------------------------------

class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that admits only the numpy reconstruction helpers CIFAR-10's batches use."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:
        raise CnnRepairError(f"{where}: not a CIFAR-10 batch ({exc}); download cifar-10-python.tar.gz again") from None
    if not isinstance(obj, dict):
        raise CnnRepairError(f"{where}: not a CIFAR-10 batch (no dict); download it again")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_from_blobs(read: Callable[[str], bytes], where: str) -> Dataset:
    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        d = _unpickle(read(name), f"{where}/{name}")
        if "data" not in d or "labels" not in d:
            raise CnnRepairError(f"{where}/{name}: CIFAR-10 batch lacks data or labels; download it again")
        data = np.asarray(d["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise CnnRepairError(f"{where}/{name}: expected rows of 3072 bytes, got shape {data.shape}")
        return data.reshape(-1, 3, 32, 32), np.asarray(d["labels"], dtype=np.int64)

    parts = [batch(f"data_batch_{i}") for i in range(1, 6)]
    xte, yte = batch("test_batch")
    classes = list(CIFAR10_CLASSES)
    try:
        meta = _unpickle(read("batches.meta"), f"{where}/batches.meta")
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get("label_names", classes)]
    except CnnRepairError:
        pass
    ds = Dataset("cifar10", np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), xte, yte, classes, where)
    return _validate(ds)


def load_cifar_pickles(folder: Path | str) -> Dataset:
    """Read CIFAR-10's canonical ``cifar-10-batches-py`` folder (pickles loaded with a safe unpickler)."""
    folder = Path(folder)
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"

    def read(name: str) -> bytes:
        path = folder / name
        if not path.is_file():
            raise CnnRepairError(f"{path}: missing CIFAR-10 batch; extract cifar-10-python.tar.gz into {folder.parent}")
        return path.read_bytes()

    return _cifar_from_blobs(read, str(folder))


# --- image folders (directory or .tar.gz) -----------------------------------------------------

def _decode_images(items: Iterable[tuple[str, str, Callable[[], bytes]]], where: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode (class, member name, reader) triples into uint8 N x C x H x W arrays."""
    from PIL import Image, UnidentifiedImageError

    items = sorted(items, key=lambda t: (t[0], t[1]))
    classes = sorted({c for c, _, _ in items})
    if not items:
        raise CnnRepairError(f"{where}: no images found; expected <split>/<class>/*.png|jpg")
    index = {c: i for i, c in enumerate(classes)}
    images, labels, mode, size = [], [], None, None
    for cls, member, read in items:
        try:
            with Image.open(io.BytesIO(read())) as im:
                if mode is None:
                    mode = "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
                    size = im.size
                if im.size != size:
                    raise CnnRepairError(f"{where}/{member}: image is {im.size[0]}x{im.size[1]}, others are {size[0]}x{size[1]}; resize the folder to one size")
                arr = np.asarray(im.convert(mode), dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise CnnRepairError(f"{where}/{member}: not a readable image ({type(exc).__name__}); remove or replace it") from None
        images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
        labels.append(index[cls])
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes


def _split_items_dir(root: Path, split: str) -> list[tuple[str, str, Callable[[], bytes]]]:
    out = []
    for cls_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
        for f in sorted(cls_dir.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                out.append((cls_dir.name, f"{split}/{cls_dir.name}/{f.name}", f.read_bytes))
    return out


def _find_split_root(names: Iterable[str]) -> str | None:
    """The prefix under which ``train/`` and ``test/`` both appear, or None."""
    prefixes: dict[str, set[str]] = {}
    for n in names:
        parts = n.strip("/").split("/")
        for i, part in enumerate(parts[:-1]):
            if part in ("train", "test"):
                prefixes.setdefault("/".join(parts[:i]), set()).add(part)
                break
    for prefix, splits in sorted(prefixes.items(), key=lambda kv: len(kv[0])):
        if splits == {"train", "test"}:
            return prefix
    return None


def load_image_folder(path: Path | str, name: str = "imagefolder") -> Dataset:
    """Read ``train/<class>/*`` and ``test/<class>/*`` from a directory or a .tar.gz of one."""
    path = Path(path)
    if path.is_dir():
        root = _find_split_root(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        if root is None:
            raise CnnRepairError(f"{path}: no train/ and test/ class folders found; expected train/<class>/*.png and test/<class>/*.png")
        base = path / root if root else path
        splits = {s: _decode_images(_split_items_dir(base, s), str(path)) for s in ("train", "test")}
    elif path.is_file():
        try:
            tar = tarfile.open(path, "r:*")
        except (tarfile.TarError, OSError) as exc:
            raise CnnRepairError(f"{path}: not a readable tar archive ({exc}); download it again") from None
        with tar:
            blobs = _read_tar_in_order(tar, path)
        root = _find_split_root(blobs)
        if root is None:
            raise CnnRepairError(f"{path}: archive has no train/ and test/ class folders; expected train/<class>/*.jpg")
        pre = f"{root}/" if root else ""
        splits = {}
        for split in ("train", "test"):
            items = []
            for rel, blob in blobs.items():
                parts = rel[len(pre):].split("/") if rel.startswith(pre) else []
                if len(parts) == 3 and parts[0] == split and Path(parts[2]).suffix.lower() in IMAGE_SUFFIXES:
                    items.append((parts[1], rel, lambda blob=blob: blob))
            splits[split] = _decode_images(items, str(path))
    else:
        raise CnnRepairError(f"{path}: image folder or archive not found; pass --data-dir pointing to it")
    (xtr, ytr, ctr), (xte, yte, cte) = splits["train"], splits["test"]
    if ctr != cte:
        raise CnnRepairError(f"{path}: train classes {ctr} differ from test classes {cte}")
    return _validate(Dataset(name, xtr, ytr, xte, yte, ctr, str(path)))


def _read_tar_in_order(tar: tarfile.TarFile, path: Path) -> dict[str, bytes]:
    """Every regular file's bytes, read in archive order (a gzipped tar cannot seek backwards cheaply)."""
    blobs = {}
    try:
        for m in tar:
            if m.isfile():
                fh = tar.extractfile(m)
                blobs[m.name.lstrip("./")] = fh.read() if fh else b""
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise CnnRepairError(f"{path}: corrupt tar archive ({exc}); download it again") from None
    return blobs


def _load_cifar_tar(path: Path) -> Dataset:
    """CIFAR-10 from a tarball: the canonical pickle one, or an image-folder one."""
    try:
        with tarfile.open(path, "r:*") as tar:
            first = tar.next()
            while first is not None and not first.isfile():
                first = tar.next()
            is_pickles = first is not None and "cifar-10-batches-py" in first.name
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise CnnRepairError(f"{path}: not a readable tar archive ({exc}); download it again") from None
    if is_pickles:
        with tarfile.open(path, "r:*") as tar:
            blobs = {k.split("/")[-1]: v for k, v in _read_tar_in_order(tar, path).items()}

        def read(n: str) -> bytes:
            if n not in blobs:
                raise CnnRepairError(f"{path}: archive lacks {n}; download cifar-10-python.tar.gz again")
            return blobs[n]
        return _cifar_from_blobs(read, str(path))
    return load_image_folder(path, name="cifar10")


# --- cache of decoded arrays ------------------------------------------------------------------

def cache_dir() -> Path:
    """Where decoded datasets are cached: $CNNREPAIR_CACHE or ~/.cache/cnnrepair."""
    return Path(os.environ.get("CNNREPAIR_CACHE", Path.home() / ".cache" / "cnnrepair"))


def _cached(source: Path, name: str, load: Callable[[], Dataset]) -> Dataset:
    """Decode once, then reuse an .npz keyed by the source's path, size and modification time."""
    st = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}|v1".encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return Dataset(name, z["x_train"], z["y_train"], z["x_test"], z["y_test"], [str(c) for c in z["classes"]], str(source))
        except Exception:
            path.unlink(missing_ok=True)
    ds = load()
    try:
        def _write(p: Path) -> None:
            with open(p, "wb") as fh:
                np.savez(fh, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test, classes=np.array(ds.classes))
        atomic_write(path, _write)
    except OSError:
        pass  # a read-only cache only costs time
    return ds


# --- front door -------------------------------------------------------------------------------

def default_data_dir(name: str) -> Path | None:
    """First existing default location for ``name``: $CNNREPAIR_DATA/<name>, ./data/<name>, ../shared/datasets."""
    cands = []
    if os.environ.get("CNNREPAIR_DATA"):
        cands.append(Path(os.environ["CNNREPAIR_DATA"]) / name)
    cands.append(Path("data") / name)
    shared = Path("..") / "shared" / "datasets"
    cands += [shared / name, shared / "cifar10-jpeg.tar.gz"] if name == "cifar10" else [shared / name]
    return next((c for c in cands if c.exists()), None)


def load_dataset(name: str, data_dir: Path | str | None = None, cache: bool = True) -> Dataset:
    """Load ``name`` (one of DATASETS) from ``data_dir`` (or a default location), detecting the format."""
    if name not in DATASETS:
        raise CnnRepairError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        return load_digits()
    path = Path(data_dir) if data_dir is not None else default_data_dir(name)
    if path is None or not path.exists():
        where = path if path is not None else f"data/{name}"
        raise CnnRepairError(f"{where}: {name} dataset not found; pass --data-dir DIR or run `cnnrepair download {name} --dest data`")
    if name == "cifar10":
        if path.is_dir() and (path / "cifar-10-python.tar.gz").is_file():  # where `cnnrepair download cifar10` puts it
            path = path / "cifar-10-python.tar.gz"
        if path.is_file():
            return _cached(path, name, lambda: _load_cifar_tar(path)) if cache else _load_cifar_tar(path)
        if (path / "data_batch_1").is_file() or (path / "cifar-10-batches-py").is_dir():
            return load_cifar_pickles(path)
        return _cached(path, name, lambda: load_image_folder(path, "cifar10")) if cache else load_image_folder(path, "cifar10")
    return load_idx_folder(path, name)


# --- downloads (for users who are online) -----------------------------------------------------

# IDX checksums are sha256 of the *decompressed* content, so re-gzipped mirrors verify too;
# "md5:" marks a checksum of the file as served (CIFAR-10's published one).
DOWNLOADS: dict[str, dict[str, tuple[str, str]]] = {
    "cifar10": {
        "cifar-10-python.tar.gz": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "md5:c58f30108f718f92721af3b95e74349a"),
    },
    "mnist": {
        f"{IDX_FILES['train_images']}.gz": ("https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz",
                                             "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        f"{IDX_FILES['train_labels']}.gz": ("https://ossci-datasets.s3.amazonaws.com/mnist/train-labels-idx1-ubyte.gz",
                                             "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        f"{IDX_FILES['test_images']}.gz": ("https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz",
                                            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        f"{IDX_FILES['test_labels']}.gz": ("https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz",
                                            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    },
}


def content_sha256(path: Path) -> str:
    """sha256 of a file's content, decompressed first if it is gzipped."""
    return hashlib.sha256(_read_maybe_gzip(Path(path))).hexdigest()


def checksum(path: Path, expected: str) -> str:
    """The file's checksum in the form of ``expected``: "md5:<hex>" of the raw file, else content sha256."""
    if expected.startswith("md5:"):
        return "md5:" + hashlib.md5(Path(path).read_bytes()).hexdigest()
    return content_sha256(path)


def download_dataset(name: str, dest: Path | str, urls: dict[str, tuple[str, str]] | None = None) -> Path:
    """Fetch ``name`` into ``dest/name``, verify every file's checksum, and return the folder."""
    table = urls if urls is not None else DOWNLOADS.get(name)
    if table is None:
        raise CnnRepairError(f"no download known for {name!r}; available: {', '.join(DOWNLOADS)} (place other datasets by hand)")
    folder = Path(dest) / name
    folder.mkdir(parents=True, exist_ok=True)
    for filename, (url, sha) in table.items():
        target = folder / filename
        if target.is_file() and checksum(target, sha) == sha:
            continue

        def _fetch(tmp: Path, url: str = url, sha: str = sha) -> None:
            try:
                with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
            except OSError as exc:
                raise CnnRepairError(f"{url}: download failed ({exc}); check the connection or place the files in {folder} by hand") from None
            got = checksum(tmp, sha)
            if got != sha:
                raise CnnRepairError(f"{url}: checksum mismatch ({got[:16]}..., expected {sha[:16]}...); the download is corrupt, try again later")

        atomic_write(target, _fetch)
    return folder
