"""Labelled image sets as float (C, H, W) tensors in [0, 1]: Fashion-MNIST (IDX files), CIFAR-10
(python pickle batches, read without running code from them) and ImageNet-style class folders."""
from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from rrcm.datasets import DATASETS, DatasetInfo
from rrcm.errors import UserError


SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


class ImageDataset(Dataset):
    """dataset[i] == (float32 image (C, H, W) in [0, 1], int label); `batch(indices)` stacks many."""

    device = torch.device("cpu")  # where `batch` gathers its tensors (and wants its indices)

    def __init__(self, name: str, num_classes: int, input_shape: tuple[int, int, int]):
        self.name = name
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) float in [0, 1] and int64 labels (B,) of `indices`."""
        images = torch.empty((len(indices), *self.input_shape))
        labels = torch.empty(len(indices), dtype=torch.int64)
        for k, i in enumerate(indices.tolist()):
            images[k], labels[k] = self[i]
        return images, labels


class TensorImageDataset(ImageDataset):
    """A dataset held in memory: `images` uint8 (N, C, H, W), `labels` int64 (N,)."""

    def __init__(self, name: str, num_classes: int, images: torch.Tensor, labels: torch.Tensor):
        super().__init__(name, num_classes, tuple(images.shape[1:]))
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].float().div_(255), int(self.labels[i])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> "TensorImageDataset":
        """The same images and labels held on `device`, so that `batch` gathers there without a copy per batch."""
        return TensorImageDataset(self.name, self.num_classes, self.images.to(device), self.labels.to(device))

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = indices.long()
        return self.images[indices].float().div_(255), self.labels[indices]


class ImageFolderDataset(ImageDataset):
    """`root/<class>/**/*.{jpeg,jpg,png}`, decoded on access; `labels` int64 (N,) is known up front."""

    def __init__(self, name: str, classes: list[str], files: list[str], labels: list[int], image_size: int):
        super().__init__(name, len(classes), (3, image_size, image_size))
        self.classes = classes
        self.files = files
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return load_image(self.files[i], self.image_size), int(self.labels[i])


def load_dataset(name: str, split: str, data_dir: str | None = None, image_size: int | None = None) -> ImageDataset:
    """The `split` ("train" or "test") of dataset `name`, read from `data_dir` (or its default folder)."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    info = DATASETS[name]
    data_dir = data_dir or info.default_dir
    if data_dir is None:
        raise UserError(f"dataset {name} has no default folder: give its data directory")
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"data directory {root} does not exist")
    if name == "imagenet":
        return _load_image_folders(info, root, split, info.input_shape[1] if image_size is None else image_size)
    if image_size not in (None, info.input_shape[1]):
        raise UserError(f"{name} images are {info.input_shape[1]} px; image size {image_size} is not supported")
    images, labels = (_load_fashion_mnist if name == "fashion-mnist" else _load_cifar10)(info, root, split)
    return TensorImageDataset(name, info.num_classes, images, labels)


def _check_labels(labels: np.ndarray, count: int, num_classes: int, path: Path) -> torch.Tensor:
    if len(labels) != count:
        raise UserError(f"{path}: {len(labels)} labels for {count} images")
    if labels.dtype.kind not in "iu" or (len(labels) and (labels.min() < 0 or labels.max() >= num_classes)):
        raise UserError(f"{path}: labels must be integers in [0, {num_classes})")
    return torch.from_numpy(labels.astype(np.int64))


# --- Fashion-MNIST: IDX files ---------------------------------------------------------------

def _find_file(root: Path, stem: str) -> Path:
    for path in (root / stem, root / f"{stem}.gz"):
        if path.is_file():
            return path
    raise UserError(f"missing file {root / stem} (or {stem}.gz)")


def _read_exactly(f, n: int) -> bytes:
    # In chunks, so a header that promises terabytes costs no more memory than the file holds.
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(min(n - len(buf), 1 << 24))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The unsigned-byte array of an IDX file (plain or gzip) with `ndim` dimensions, fully checked."""
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or magic[3] != ndim:
                raise UserError(f"{path}: bad magic number {magic.hex()}, expected 000008{ndim:02x} (uint8 IDX, {ndim}-d)")
            header = f.read(4 * ndim)
            if len(header) < 4 * ndim:
                raise UserError(f"{path}: truncated IDX header")
            dims = struct.unpack(f">{ndim}I", header)
            size = math.prod(dims)
            data = _read_exactly(f, size)
            if len(data) < size:
                raise UserError(f"{path}: truncated: header promises {size} data bytes, file holds {len(data)}")
            if f.read(1):
                raise UserError(f"{path}: unexpected bytes after the {'x'.join(map(str, dims))} array")
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read {path}: {e}") from e
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _load_fashion_mnist(info: DatasetInfo, root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    image_path = _find_file(root, f"{prefix}-images-idx3-ubyte")
    label_path = _find_file(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(image_path, 3)
    if images.shape[1:] != info.input_shape[1:]:
        _, h, w = info.input_shape
        raise UserError(f"{image_path}: images are {images.shape[1]}x{images.shape[2]}, expected {h}x{w}")
    labels = _check_labels(read_idx(label_path, 1), len(images), info.num_classes, label_path)
    return torch.from_numpy(images.copy()).unsqueeze(1), labels


# --- CIFAR-10: python pickle batches ----------------------------------------------------------

def _latin1_encode(text: str, encoding: str) -> bytes:
    # How protocol-2 pickles written by Python 3 spell a bytes object: _codecs.encode(text, "latin1").
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused codec {encoding!r}")
    return text.encode("latin-1")


def _frombuffer(buffer, dtype, shape, order):
    # How protocol-5 pickles rebuild an array (numpy's own `_frombuffer`, restated).
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


_reconstruct = np.ndarray(0).__reduce__()[0]  # numpy.core.multiarray._reconstruct, wherever numpy keeps it
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: any other global is refused."""

    def __init__(self, f, path: Path):
        super().__init__(f, encoding="latin1")  # numpy's advice for Python 2 pickles like CIFAR-10's
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            raise UserError(f"{self.path}: refused to load unsafe pickle object {module}.{name}")
        return _SAFE_GLOBALS[(module, name)]


def read_array_pickle(path: Path):
    """The object in pickle file `path`, if it holds only dicts, lists, scalars, strings and numpy arrays."""
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, path).load()
    except UserError:
        raise
    except Exception as e:  # a corrupt pickle can fail in any of the unpickler's or numpy's ways
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def _get(batch: dict, key: str):
    for k in (key, key.encode()):
        if k in batch:
            return batch[k]
    return None


def _read_cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, torch.Tensor]:
    batch = read_array_pickle(path)
    data = _get(batch, "data") if isinstance(batch, dict) else None
    labels = _get(batch, "labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or labels is None:
        raise UserError(f"{path}: not a CIFAR-10 batch (needs 'data' array and 'labels')")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    return data, _check_labels(np.asarray(labels), len(data), num_classes, path)


def _load_cifar10(info: DatasetInfo, root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not (root / names[0]).is_file() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    for name in names:
        if not (root / name).is_file():
            raise UserError(f"missing CIFAR-10 batch {root / name} (extract cifar-10-python.tar.gz there)")
    batches = [_read_cifar_batch(root / name, info.num_classes) for name in names]
    data = np.concatenate([d for d, _ in batches])
    # Each row holds the red, green and blue planes in turn, row-major: exactly (3, 32, 32).
    images = torch.from_numpy(data.reshape(-1, *info.input_shape).copy())
    return images, torch.cat([labels for _, labels in batches])


# --- ImageNet-style class folders ---------------------------------------------------------------

def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Short side to `size` (BOX halvings while that is >= 2x too big, then BICUBIC), centre crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Image file -> RGB -> `center_crop_resize` -> float32 (3, size, size) in [0, 1]."""
    try:
        with Image.open(path) as image:
            image = center_crop_resize(image.convert("RGB"), size)
    except Exception as e:  # PIL's decoders fail on corrupt files with many exception types
        raise UserError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255)


def _list_images(folder: str) -> list[str]:
    """The image files under `folder`, following links: each real folder walked once (a link loop ends
    there) and each real file listed once, under the first path of the (sorted, top-down) walk."""
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    found = []
    for dirpath, dirnames, files in os.walk(folder, followlinks=True, onerror=_walk_error):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames.clear()
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError as e:
                raise UserError(f"cannot read image {path}: {e.strerror}") from None
            if (st.st_dev, st.st_ino) not in seen_files:
                seen_files.add((st.st_dev, st.st_ino))
                found.append(path)
    return sorted(found)


def _walk_error(e: OSError) -> None:
    raise UserError(f"cannot list {e.filename}: {e.strerror}")


def _load_image_folders(info: DatasetInfo, root: Path, split: str, image_size: int) -> ImageFolderDataset:
    if image_size < 1:
        raise UserError(f"image size must be positive, got {image_size}")
    split_dir = root / ("train" if split == "train" else "val")
    if not split_dir.is_dir():
        raise UserError(f"missing folder {split_dir} (expected {split_dir}/<class>/<images>)")
    # Classes of both splits, so a class missing from one split does not shift the other labels.
    classes = sorted({e.name for d in (root / "train", root / "val") if d.is_dir() for e in os.scandir(d) if e.is_dir()})
    files, labels = [], []
    for label, cls in enumerate(classes):
        found = _list_images(str(split_dir / cls)) if (split_dir / cls).is_dir() else []
        files += found
        labels += [label] * len(found)
    if not files:
        raise UserError(f"no {', '.join(IMAGE_EXTENSIONS)} images in class folders of {split_dir}")
    return ImageFolderDataset(info.name, classes, files, labels, image_size)
