import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from rrcm.data import DATASETS, ImageDataset, load_dataset, load_image
from rrcm.errors import UserError

FMNIST_DIR = Path(DATASETS["fashion-mnist"].default_dir)


# --- Fashion-MNIST (IDX) -----------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write(path: Path, data: bytes, gz: bool) -> Path:
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_fmnist(root: Path, split: str = "t10k", n: int = 7, gz: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    image_path = write(root / f"{split}-images-idx3-ubyte", idx_bytes(images), gz)
    label_path = write(root / f"{split}-labels-idx1-ubyte", idx_bytes(labels), gz)
    return images, labels, image_path, label_path


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    images, labels, _, _ = write_fmnist(tmp_path, "train", n=9, gz=gz)
    ds = load_dataset("fashion-mnist", "train", str(tmp_path))
    assert isinstance(ds, ImageDataset) and len(ds) == 9
    assert (ds.name, ds.num_classes, ds.input_shape) == ("fashion-mnist", 10, (1, 28, 28))
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (9, 1, 28, 28)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
    x, y = ds[4]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and y == labels[4]
    assert torch.allclose(x[0], torch.from_numpy(images[4]).float() / 255)
    xb, yb = ds.batch(torch.tensor([4, 0]))
    assert torch.equal(xb[0], x) and yb.tolist() == [labels[4], labels[0]]


def test_real_fashion_mnist_test_split():
    if not FMNIST_DIR.is_dir():
        pytest.skip(f"{FMNIST_DIR} not present")
    ds = load_dataset("fashion-mnist", "test")
    assert len(ds) == 10000 and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    x, y = ds.batch(torch.arange(0, 10000, 97))
    assert x.shape == (104, 1, 28, 28) and 0 <= x.min() and x.max() <= 1 and x.max() == 1
    assert 0.2 < ds.images.float().mean() / 255 < 0.4  # dark background, bright garments


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path, gz):
    images, labels, image_path, _ = write_fmnist(tmp_path, gz=gz)
    write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(images)[:-5], gz)
    with pytest.raises(UserError, match=image_path.name):
        load_dataset("fashion-mnist", "test", str(tmp_path))


def test_idx_truncated_gzip_stream(tmp_path):
    _, _, image_path, _ = write_fmnist(tmp_path, gz=True)
    image_path.write_bytes(image_path.read_bytes()[:-100])
    with pytest.raises(UserError, match=image_path.name):
        load_dataset("fashion-mnist", "test", str(tmp_path))


def test_idx_truncated_header(tmp_path):
    _, _, image_path, _ = write_fmnist(tmp_path)
    image_path.write_bytes(image_path.read_bytes()[:9])
    with pytest.raises(UserError, match=f"{image_path.name}: truncated IDX header"):
        load_dataset("fashion-mnist", "test", str(tmp_path))


@pytest.mark.parametrize("which", ["images", "labels"])
def test_idx_wrong_magic(tmp_path, which):
    _, _, image_path, label_path = write_fmnist(tmp_path)
    path = image_path if which == "images" else label_path
    data = bytearray(path.read_bytes())
    data[2] = 0x0D  # float32 instead of unsigned byte
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{path.name}: bad magic number"):
        load_dataset("fashion-mnist", "test", str(tmp_path))


def test_idx_labels_file_as_images(tmp_path):
    _, labels, image_path, _ = write_fmnist(tmp_path)
    image_path.write_bytes(idx_bytes(labels))  # a 1-d file where a 3-d one belongs
    with pytest.raises(UserError, match=f"{image_path.name}: bad magic number"):
        load_dataset("fashion-mnist", "test", str(tmp_path))


def test_idx_count_mismatch(tmp_path):
    _, labels, _, label_path = write_fmnist(tmp_path, n=7)
    label_path.write_bytes(idx_bytes(labels[:6]))
    with pytest.raises(UserError, match=f"{label_path.name}: 6 labels for 7 images"):
        load_dataset("fashion-mnist", "test", str(tmp_path))


def test_idx_label_out_of_range(tmp_path):
    _, labels, _, label_path = write_fmnist(tmp_path)
    labels[3] = 10
    label_path.write_bytes(idx_bytes(labels))
    with pytest.raises(UserError, match=f"{label_path.name}: labels must be integers in \\[0, 10\\)"):
        load_dataset("fashion-mnist", "test", str(tmp_path))


def test_idx_trailing_bytes_and_wrong_size(tmp_path):
    images, _, image_path, _ = write_fmnist(tmp_path)
    image_path.write_bytes(idx_bytes(images) + b"\0")
    with pytest.raises(UserError, match=f"{image_path.name}: unexpected bytes"):
        load_dataset("fashion-mnist", "test", str(tmp_path))
    image_path.write_bytes(idx_bytes(np.zeros((7, 32, 32), np.uint8)))
    with pytest.raises(UserError, match=f"{image_path.name}: images are 32x32, expected 28x28"):
        load_dataset("fashion-mnist", "test", str(tmp_path))


def test_idx_huge_header_costs_nothing(tmp_path):
    _, _, image_path, _ = write_fmnist(tmp_path)
    image_path.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**31, 28, 28) + b"\0" * 100)
    with pytest.raises(UserError, match="truncated: header promises"):
        load_dataset("fashion-mnist", "test", str(tmp_path))


def test_bad_arguments(tmp_path):
    write_fmnist(tmp_path)
    with pytest.raises(UserError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", "test", str(tmp_path))
    with pytest.raises(UserError, match="unknown split 'val'"):
        load_dataset("fashion-mnist", "val", str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("fashion-mnist", "test", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        load_dataset("fashion-mnist", "train", str(tmp_path))
    with pytest.raises(UserError, match="image size 32"):
        load_dataset("fashion-mnist", "test", str(tmp_path), image_size=32)
    with pytest.raises(UserError, match="cifar10 has no default folder"):
        load_dataset("cifar10", "test")


# --- CIFAR-10 (pickle batches) -----------------------------------------------------------------

def write_cifar(root: Path, n: int = 4, protocol: int = 2, str_keys: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        key = (lambda k: k) if str_keys else (lambda k: k.encode())
        batch = {key("batch_label"): key(name), key("labels"): labels, key("data"): data,
                 key("filenames"): [key(f"img_{i}.png") for i in range(n)]}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        written[name] = (data, labels)
    return written


@pytest.mark.parametrize("protocol,str_keys", [(2, False), (4, False), (5, False), (4, True)])
def test_cifar_round_trip(tmp_path, protocol, str_keys):
    written = write_cifar(tmp_path, protocol=protocol, str_keys=str_keys)
    train = load_dataset("cifar10", "train", str(tmp_path))
    assert (len(train), train.num_classes, train.input_shape) == (20, 10, (3, 32, 32))
    data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert torch.equal(train.images, torch.from_numpy(data).view(20, 3, 32, 32))
    assert train.labels.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    test = load_dataset("cifar10", "test", str(tmp_path))
    x, y = test[2]
    red_plane = written["test_batch"][0][2, :1024].reshape(32, 32)
    assert torch.allclose(x[0], torch.from_numpy(red_plane).float() / 255)  # rows are R, G, B planes
    assert y == written["test_batch"][1][2]


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` opcodes, as cPickle did for the real CIFAR-10 files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def test_cifar_nested_folder_and_python2_numpy1_pickles(tmp_path):
    written = write_cifar(tmp_path / "cifar-10-batches-py", protocol=2)
    data, labels = written["test_batch"]
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump({b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": data})
    raw = buf.getvalue()
    # numpy 1 (which wrote the real files) names numpy.core, not numpy._core.
    assert b"numpy._core.multiarray\n_reconstruct" in raw
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    test = load_dataset("cifar10", "test", str(tmp_path))
    assert torch.equal(test.images.view(4, -1), torch.from_numpy(data)) and test.labels.tolist() == labels


class Exploit:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("payload", ["system", "eval", "codec", "nested"])
def test_cifar_malicious_pickle_refused(tmp_path, payload):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    evil = {
        "system": Exploit(os.system, f"touch {marker}"),
        "eval": Exploit(eval, f"open({str(marker)!r}, 'w').close()"),
        "codec": Exploit(__import__("_codecs").encode, "x", "rot13"),
        "nested": {b"data": np.zeros((1, 3072), np.uint8), b"labels": [Exploit(os.system, f"touch {marker}")]},
    }[payload]
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(UserError, match="test_batch"):
        load_dataset("cifar10", "test", str(tmp_path))
    assert not marker.exists()


def test_cifar_corrupt_and_wrong_batches(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "test_batch"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="cannot read .*test_batch"):
        load_dataset("cifar10", "test", str(tmp_path))
    for bad, message in [
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "must be uint8"),
        ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, "shape \\(N, 3072\\)"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "1 labels for 2 images"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "labels must be integers"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "not a CIFAR-10 batch"),
        ([1, 2, 3], "not a CIFAR-10 batch"),
    ]:
        path.write_bytes(pickle.dumps(bad, protocol=4))
        with pytest.raises(UserError, match=message):
            load_dataset("cifar10", "test", str(tmp_path))
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(UserError, match="missing CIFAR-10 batch .*data_batch_3"):
        load_dataset("cifar10", "train", str(tmp_path))


# --- ImageNet-style class folders ----------------------------------------------------------------

def save(path: Path, image: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)
    return path


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    save(tmp_path / "train/dog/a.png", Image.fromarray(pattern))
    halves = np.zeros((80, 40, 3), np.uint8)  # 40 wide, 80 tall: red top half, green bottom half
    halves[:40, :, 0] = 255
    halves[40:, :, 1] = 255
    save(tmp_path / "train/dog/sub/b.PNG", Image.fromarray(halves))
    save(tmp_path / "train/cat/c.JPEG", Image.new("RGB", (45, 30), (200, 40, 90)), quality=95)
    save(tmp_path / "train/cat/d.jpg", Image.new("L", (17, 33), 77))
    save(tmp_path / "train/cat/e.png", Image.new("RGBA", (21, 19), (10, 20, 30, 40)))
    (tmp_path / "train/cat/notes.txt").write_text("not an image")
    save(tmp_path / "val/dog/f.png", Image.new("RGB", (31, 29), (0, 0, 255)))
    (tmp_path / "val/cow").mkdir()  # an empty class still has its label
    return tmp_path, pattern


def test_image_folders(folders):
    root, pattern = folders
    ds = load_dataset("imagenet", "train", str(root), image_size=16)
    assert ds.classes == ["cat", "cow", "dog"] and ds.num_classes == 3 and ds.input_shape == (3, 16, 16)
    assert [Path(f).name for f in ds.files] == ["c.JPEG", "d.jpg", "e.png", "a.png", "b.PNG"]
    assert ds.labels.tolist() == [0, 0, 0, 2, 2]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    # A 16 x 16 image passes through untouched.
    assert torch.equal(ds[3][0], torch.from_numpy(pattern).permute(2, 0, 1).float() / 255)
    # 40 x 80 -> BOX halving to 20 x 40 -> BICUBIC to 16 x 32 -> centre rows 8..24: 8 red rows, 8 green.
    x = ds[4][0]
    assert torch.allclose(x[:, :5], torch.tensor([1.0, 0, 0]).view(3, 1, 1), atol=1 / 255)
    assert torch.allclose(x[:, 11:], torch.tensor([0, 1.0, 0]).view(3, 1, 1), atol=1 / 255)
    assert torch.allclose(ds[0][0], torch.tensor([200, 40, 90]).view(3, 1, 1) / 255, atol=4 / 255)  # JPEG
    assert torch.allclose(ds[1][0], torch.full((3, 16, 16), 77 / 255))  # grayscale -> RGB
    val = load_dataset("imagenet", "test", str(root), image_size=16)
    assert val.classes == ds.classes and val.labels.tolist() == [2]
    assert torch.allclose(val[0][0], torch.tensor([0, 0, 1.0]).view(3, 1, 1))


def test_image_folders_batch_and_dataloader(folders):
    root, _ = folders
    ds = load_dataset("imagenet", "train", str(root), image_size=12)
    xb, yb = ds.batch(torch.tensor([4, 1, 3]))
    assert xb.shape == (3, 3, 12, 12) and yb.tolist() == [2, 0, 2]
    assert torch.equal(xb[1], ds[1][0])
    batches = list(DataLoader(ds, batch_size=2))
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([b[0] for b in batches]), ds.batch(torch.arange(5))[0])
    assert torch.cat([b[1] for b in batches]).tolist() == ds.labels.tolist()


def test_default_image_size_is_224(folders):
    root, _ = folders
    ds = load_dataset("imagenet", "test", str(root))
    assert ds.input_shape == (3, 224, 224) and ds[0][0].shape == (3, 224, 224)


def test_load_image_large_and_odd_sizes(tmp_path):
    for w, h in [(500, 333), (333, 500), (224, 225), (7, 3)]:
        path = save(tmp_path / f"{w}x{h}.png", Image.new("RGB", (w, h), (10, 200, 30)))
        x = load_image(path, 224)
        assert x.shape == (3, 224, 224)
        assert torch.allclose(x, torch.tensor([10, 200, 30]).view(3, 1, 1) / 255, atol=1 / 255)


def test_corrupt_images(folders):
    root, _ = folders
    (root / "train/cat/c.JPEG").write_bytes(b"this is not a jpeg")
    ds = load_dataset("imagenet", "train", str(root), image_size=16)
    with pytest.raises(UserError, match="cannot read image .*c.JPEG"):
        ds[0]
    with pytest.raises(UserError, match="c.JPEG"):
        ds.batch(torch.tensor([1, 0]))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "train/cat/d.jpg").write_bytes(buf.getvalue()[:300])  # truncated mid-scan
    with pytest.raises(UserError, match="d.jpg"):
        ds[1]


def test_image_folder_errors(tmp_path):
    (tmp_path / "train/cat").mkdir(parents=True)
    with pytest.raises(UserError, match="missing folder .*val"):
        load_dataset("imagenet", "test", str(tmp_path))
    with pytest.raises(UserError, match="no .* images in class folders of .*train"):
        load_dataset("imagenet", "train", str(tmp_path))
    with pytest.raises(UserError, match="image size must be positive"):
        load_dataset("imagenet", "train", str(tmp_path), image_size=0)
    with pytest.raises(UserError, match="imagenet has no default folder"):
        load_dataset("imagenet", "train")
