"""Data of the learning-to-reweight experiments: imbalanced MNIST (real test split and generated
IDX files), label-noise functions, and noisy CIFAR from generated official-format pickles."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import socket
import tarfile
import urllib.error
from pathlib import Path

import pytest
import torch

from metarun.data import (
    SplitData,
    background_flip,
    load_cifar_noisy,
    load_mnist_imbalance,
    uniform_flip,
)
from metarun.data.download import DOWNLOAD_TIMEOUT_S
from metarun.testing import (
    cifar_batch,
    fingerprints,
    marked_label,
    write_cifar,
    write_mnist,
    write_pickle,
)

# --------------------------------------------------------------------------- helpers


def _digit_of(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0, 1, 0] * 255).round().long() // 20


def _marker_of(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0, 0, 0] * 255).round().long()


# --------------------------------------------------------------------------- real MNIST test split

# The official test split: 982 images of digit 4 and 1,009 of digit 9.
LARGEST_N_TRAIN = {0.995: 1008, 0.9: 1114}


@pytest.fixture(scope="module")
def mnist_root() -> Path:
    data = os.environ.get("METARUN_DATA")
    if not data:
        pytest.skip("METARUN_DATA is unset: real-MNIST tests read $METARUN_DATA/mnist/raw/")
    return Path(data)


@pytest.fixture(scope="module")
def mnist_digits(mnist_root: Path) -> dict[bytes, int]:
    """Image bytes -> digit over the whole official test split, read independently."""
    raw = mnist_root / "mnist" / "raw"
    images = gzip.decompress((raw / "t10k-images-idx3-ubyte.gz").read_bytes())[16:]
    labels = gzip.decompress((raw / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:]
    assert len(labels) == 10_000 and len(images) == 10_000 * 784
    return {images[i * 784 : (i + 1) * 784]: labels[i] for i in range(10_000)}


def _check_pools(data: SplitData, digit_of: dict[bytes, int]) -> None:
    pools = {
        "train": (data.train_x, data.train_y),
        "val": (data.val_x, data.val_y),
        "test": (data.test_x, data.test_y),
    }
    seen: set[bytes] = set()
    for name, (x, y) in pools.items():
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28), name
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],), name
        assert x.min() >= 0.0 and x.max() == 1.0, name
        raw = [bytes((img * 255).round().to(torch.uint8).flatten().tolist()) for img in x]
        # Every image is one of the split's, with its own digit: label 0 <-> 4, 1 <-> 9.
        assert [digit_of[r] for r in raw] == [9 if v else 4 for v in y.tolist()], name
        assert len(set(raw)) == len(raw), name  # no image twice in a pool ...
        assert not seen & set(raw), name  # ... nor in two pools
        seen |= set(raw)
    assert data.num_classes == 2 and data.minority_class == 0 and data.train_y_true is None


@pytest.mark.parametrize("pos_ratio", [0.995, 0.9])
def test_real_test_split_largest_n_train_and_error_beyond(
    mnist_root: Path, mnist_digits: dict[bytes, int], pos_ratio: float
) -> None:
    largest = LARGEST_N_TRAIN[pos_ratio]
    data = load_mnist_imbalance(
        mnist_root, pos_ratio=pos_ratio, n_train=largest, source_split="test"
    )
    dominant = round(pos_ratio * largest)
    assert len(data.train_y) == largest and int(data.train_y.sum()) == dominant
    assert data.val_y.tolist().count(0) == data.val_y.tolist().count(1) == 5
    # All of digit 9 is used up: 1009 = dominant + 5 (val) + test/2.
    assert len(data.test_y) == 2 * (1009 - dominant - 5) and data.test_y.float().mean() == 0.5
    _check_pools(data, mnist_digits)
    # Shuffled: the classes are mixed, not in blocks.
    assert data.train_y[: largest // 2].sum() not in (0, largest // 2)

    with pytest.raises(ValueError) as error:
        load_mnist_imbalance(
            mnist_root, pos_ratio=pos_ratio, n_train=largest + 1, source_split="test"
        )
    message = str(error.value)
    need = round(pos_ratio * (largest + 1))
    for needle in (
        f"dataset.pos_ratio={pos_ratio}",
        f"dataset.n_train={largest + 1}",
        "dataset.source_split=test",
        f"{need} (train) + 5 (val) + 1 (test, at least) = {need + 6} of digit 9, 1009 available",
        f"the largest dataset.n_train that works with these settings "
        f"(dataset.n_val=10, dataset.n_test=null) is {largest}",
        "dataset.source_split=train",
    ):
        assert needle in message


def test_real_paper_default_5000_does_not_fit_the_test_split(mnist_root: Path) -> None:
    with pytest.raises(ValueError) as error:
        load_mnist_imbalance(mnist_root, source_split="test")  # pos_ratio 0.995, n_train 5000
    message = str(error.value)
    assert (
        "4975 (train) + 5 (val) + 1 (test, at least) = 4981 of digit 9, 1009 available" in message
    )
    assert "25 (train) + 5 (val) + 1 (test, at least) = 31 of digit 4, 982 available" in message
    assert "is 1008 (leaving a test set of 2" in message


def test_real_explicit_n_test_and_balanced_pools(
    mnist_root: Path, mnist_digits: dict[bytes, int]
) -> None:
    data = load_mnist_imbalance(
        mnist_root, pos_ratio=0.995, n_train=758, n_val=20, n_test=480, source_split="test"
    )
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (758, 20, 480)
    assert int(data.train_y.sum()) == 754  # round(0.995 * 758)
    assert torch.bincount(data.val_y).tolist() == [10, 10]
    assert torch.bincount(data.test_y).tolist() == [240, 240]
    _check_pools(data, mnist_digits)
    with pytest.raises(ValueError, match=r"dataset\.n_test=500\) is 758"):
        load_mnist_imbalance(mnist_root, n_train=759, n_test=500, source_split="test")


def test_real_deterministic_given_seed(mnist_root: Path) -> None:
    kwargs = {"pos_ratio": 0.9, "n_train": 600, "n_test": 100, "source_split": "test"}
    torch.manual_seed(1)
    a = load_mnist_imbalance(mnist_root, seed=3, **kwargs)
    torch.manual_seed(2)  # the global RNG must not matter
    b = load_mnist_imbalance(mnist_root, seed=3, **kwargs)
    c = load_mnist_imbalance(mnist_root, seed=4, **kwargs)
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert not torch.equal(getattr(a, name), getattr(c, name)), name


# --------------------------------------------------------------------------- generated MNIST


def test_source_split_train_reads_train_file_for_train_and_val(tmp_path: Path) -> None:
    # torchvision's layout with extracted files for one split, gzipped in raw/ for the other.
    write_mnist(tmp_path / "MNIST" / "raw", "train", {4: 300, 9: 400, 1: 50}, marker=1, gz=False)
    write_mnist(tmp_path / "raw", "t10k", {4: 60, 9: 70, 3: 20}, marker=2, gz=True)
    data = load_mnist_imbalance(tmp_path, pos_ratio=0.9, n_train=350, n_val=4)
    assert int(data.train_y.sum()) == 315 and len(data.train_y) == 350
    assert (_marker_of(data.train_x) == 1).all() and (_marker_of(data.val_x) == 1).all()
    assert (_marker_of(data.test_x) == 2).all()
    assert torch.bincount(data.test_y).tolist() == [60, 60]  # n_test None: largest balanced
    for x, y in (
        (data.train_x, data.train_y),
        (data.val_x, data.val_y),
        (data.test_x, data.test_y),
    ):
        assert torch.equal(_digit_of(x), torch.where(y == 1, 9, 4))
    train_val = fingerprints(data.train_x) + fingerprints(data.val_x)
    assert len(set(train_val)) == 354

    # Other digits, minority first: 1 vs 4 with 1 the minority.
    other = load_mnist_imbalance(tmp_path, digits=(1, 4), pos_ratio=0.9, n_train=300, n_val=2)
    assert torch.equal(_digit_of(other.train_x), torch.where(other.train_y == 1, 4, 1))
    assert int((other.train_y == 0).sum()) == 30


def test_source_split_train_too_large_names_keys_and_fix(tmp_path: Path) -> None:
    write_mnist(tmp_path / "mnist" / "raw", "train", {4: 30, 9: 100}, marker=1, gz=True)
    write_mnist(tmp_path / "mnist" / "raw", "t10k", {4: 10, 9: 10}, marker=2, gz=True)
    with pytest.raises(ValueError) as error:
        load_mnist_imbalance(tmp_path, pos_ratio=0.9, n_train=200, n_val=10)
    message = str(error.value)
    assert "dataset.source_split=train" in message and "dataset.n_train=200" in message
    assert "180 (train) + 5 (val) = 185 of digit 9, 100 available" in message
    assert "is 106" in message  # round(0.9 * 106) + 5 = 100
    assert "lower dataset.pos_ratio" in message
    assert len(load_mnist_imbalance(tmp_path, pos_ratio=0.9, n_train=106).train_y) == 106
    with pytest.raises(ValueError, match=r"dataset\.n_test=22 needs 11 test images of each"):
        load_mnist_imbalance(tmp_path, pos_ratio=0.9, n_train=100, n_test=22)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pos_ratio": 1.0}, r"dataset\.pos_ratio must be in \[0\.5, 1\).*got 1\.0"),
        ({"pos_ratio": 0.3}, r"dataset\.pos_ratio must be in \[0\.5, 1\)"),
        ({"n_train": 0}, r"dataset\.n_train must be >= 1, got 0"),
        ({"n_val": 5}, r"dataset\.n_val must be an even number >= 2.*got 5"),
        ({"n_test": 0}, r"dataset\.n_test must be null .* got 0"),
        ({"digits": (4, 4)}, r"dataset\.digits must be two different digits.*\(4, 4\)"),
        ({"source_split": "val"}, r"dataset\.source_split must be one of train, test, got 'val'"),
        (
            {"pos_ratio": 0.995, "n_train": 100},
            r"dataset\.n_train=100 at dataset\.pos_ratio=0\.995 leaves no image of the minority "
            r"digit 4.*dataset\.n_train>=101",
        ),
    ],
)
def test_mnist_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    write_mnist(tmp_path / "mnist" / "raw", "t10k", {4: 300, 9: 300}, marker=2, gz=True)
    with pytest.raises(ValueError, match=message):
        load_mnist_imbalance(tmp_path, **{"source_split": "test", **kwargs})


def test_mnist_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        load_mnist_imbalance(tmp_path, source_split="test")
    message = str(error.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "dataset.download=true" in message
    assert str(tmp_path / "MNIST" / "raw") in message and str(tmp_path / "mnist" / "raw") in message

    # Only the test split present: source_split=train says what is missing and the way out.
    write_mnist(tmp_path / "mnist" / "raw", "t10k", {4: 30, 9: 30}, marker=2, gz=True)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz.*source_split=test"):
        load_mnist_imbalance(tmp_path, source_split="train")

    images = tmp_path / "mnist" / "raw" / "t10k-images-idx3-ubyte.gz"
    full = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(full[:-100]))
    with pytest.raises(ValueError, match="truncated"):
        load_mnist_imbalance(tmp_path, source_split="test", n_train=20, n_val=2)
    images.write_bytes(gzip.compress(full)[:-50])  # a cut-off gzip stream
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_mnist_imbalance(tmp_path, source_split="test", n_train=20, n_val=2)
    images.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + full[4:]))  # floats, not bytes
    with pytest.raises(ValueError, match="not an IDX file of 3-d unsigned bytes"):
        load_mnist_imbalance(tmp_path, source_split="test", n_train=20, n_val=2)


def test_mnist_offline_download_fails_fast_with_clear_error(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets.utils as tv_utils

    seen: list[tuple[str, float | None]] = []

    def offline(url: str, root: str, filename: str, md5: str) -> None:
        seen.append((url, socket.getdefaulttimeout()))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    before = socket.getdefaulttimeout()
    with pytest.raises(RuntimeError) as error:
        load_mnist_imbalance(tmp_path, source_split="test", download=True)
    message = str(error.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "name resolution" in message
    assert "dataset.download=true" in message and "dataset.root" in message
    assert seen and all(timeout == DOWNLOAD_TIMEOUT_S for _, timeout in seen)
    assert len({url for url, _ in seen}) == len(seen) >= 2  # every mirror tried once
    assert socket.getdefaulttimeout() == before  # restored
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing half-written


def test_mnist_download_places_files_atomically(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets.utils as tv_utils

    source = tmp_path / "source"
    write_mnist(source, "t10k", {4: 40, 9: 80}, marker=3, gz=True)
    calls: list[tuple[str, str]] = []

    def fake_download(url: str, root: str, filename: str, md5: str) -> None:
        calls.append((filename, md5))
        assert Path(root).name.startswith(".download.")  # a staging folder, not the destination
        (Path(root) / filename).write_bytes((source / filename).read_bytes())

    monkeypatch.setattr(tv_utils, "download_url", fake_download)
    root = tmp_path / "data"
    data = load_mnist_imbalance(
        root, source_split="test", pos_ratio=0.9, n_train=50, n_val=2, download=True
    )
    assert len(data.train_y) == 50 and (_marker_of(data.test_x) == 3).all()
    assert dict(calls) == {
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == ["MNIST/raw/t10k-images-idx3-ubyte.gz", "MNIST/raw/t10k-labels-idx1-ubyte.gz"]
    assert not list(root.rglob(".download.*"))
    # Present now: a second call downloads nothing.
    load_mnist_imbalance(
        root, source_split="test", pos_ratio=0.9, n_train=50, n_val=2, download=True
    )
    assert len(calls) == 2


# --------------------------------------------------------------------------- label noise


def _balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    labels = torch.arange(n) % num_classes
    return labels[torch.randperm(n, generator=torch.Generator().manual_seed(0))]


def test_uniform_flip_changes_exactly_the_fraction_to_other_classes() -> None:
    labels = _balanced_labels(20_000, 10)
    original = labels.clone()
    state = torch.get_rng_state()
    noisy = uniform_flip(labels, 10, 0.4, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(labels, original)
    assert noisy.dtype == torch.int64 and noisy.shape == labels.shape
    changed = noisy != labels
    assert int(changed.sum()) == 8000  # exactly round(0.4 * N): a flip never keeps the label
    # Flipped examples are spread over the true classes, and go uniformly to the 9 others:
    # each (true, new) pair expects 8000 / 90 = 88.9 (binomial sd ~9.4).
    pairs = torch.zeros(10, 10, dtype=torch.long)
    pairs.index_put_((labels[changed], noisy[changed]), torch.ones(8000, dtype=torch.long), True)
    assert pairs.diagonal().sum() == 0
    off = pairs[~torch.eye(10, dtype=torch.bool)].float()
    assert off.min() > 88.9 - 45 and off.max() < 88.9 + 45
    assert (pairs.sum(1).float() - 800).abs().max() < 120  # per true class ~800
    assert torch.equal(noisy, uniform_flip(labels, 10, 0.4, torch.Generator().manual_seed(0)))
    assert not torch.equal(noisy, uniform_flip(labels, 10, 0.4, torch.Generator().manual_seed(1)))
    assert int((uniform_flip(labels[:7], 10, 0.5, torch.Generator()) != labels[:7]).sum()) == 4


def test_uniform_flip_resampling_variant_and_edge_rates() -> None:
    labels = _balanced_labels(20_000, 10)
    g = torch.Generator().manual_seed(0)
    resampled = uniform_flip(labels, 10, 0.4, g, exclude_true=False)
    # The official code's resampling: about 1/10 of the 8000 redrawn keep their label.
    assert abs(float((resampled != labels).float().mean()) - 0.36) < 0.01
    assert torch.bincount(resampled, minlength=10).min() > 1800  # every class reachable
    assert torch.equal(uniform_flip(labels, 10, 0.0, g), labels)
    assert (uniform_flip(labels, 10, 1.0, g) != labels).all()
    two = uniform_flip(labels % 2, 2, 1.0, g)
    assert torch.equal(two, 1 - labels % 2)


def test_background_flip_sends_the_fraction_to_one_class() -> None:
    labels = _balanced_labels(20_000, 10)
    noisy = background_flip(labels, 10, 0.4, torch.Generator().manual_seed(0), background=3)
    changed = noisy != labels
    assert (noisy[changed] == 3).all() and (labels[changed] != 3).all()
    # 8000 set to class 3, of which the ~800 already of class 3 stay correct.
    assert abs(float(changed.float().mean()) - 0.4 * 0.9) < 0.01
    assert int((noisy == 3).sum()) == 2000 + int(changed.sum())
    # Other classes lose about 40% each, uniformly.
    kept = torch.bincount(noisy[noisy != 3], minlength=10).float()
    kept = kept[torch.arange(10) != 3]
    assert (kept - 1200).abs().max() < 100
    assert (background_flip(labels, 10, 1.0, torch.Generator(), background=0) == 0).all()
    assert torch.equal(background_flip(labels, 10, 0.0, torch.Generator(), background=0), labels)


def test_background_flip_draws_the_background_class_from_the_generator() -> None:
    labels = _balanced_labels(1000, 10)
    drawn = {
        int(torch.mode(background_flip(labels, 10, 0.5, torch.Generator().manual_seed(s))).values)
        for s in range(12)
    }
    assert len(drawn) > 3  # not a fixed class
    a = background_flip(labels, 10, 0.5, torch.Generator().manual_seed(5))
    assert torch.equal(a, background_flip(labels, 10, 0.5, torch.Generator().manual_seed(5)))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda y: uniform_flip(y, 10, 1.5, torch.Generator()), ValueError, r"noise must be in"),
        (lambda y: uniform_flip(y, 1, 0.4, torch.Generator()), ValueError, r"num_classes >= 2"),
        (lambda y: uniform_flip(y, 5, 0.4, torch.Generator()), ValueError, r"\[0, 5\), got \[0, 9"),
        (lambda y: uniform_flip(y.float(), 10, 0.4, torch.Generator()), TypeError, r"int64"),
        (
            lambda y: background_flip(y, 10, 0.4, torch.Generator(), background=10),
            ValueError,
            r"dataset\.background must be a class in \[0, 10\), got 10",
        ),
    ],
)
def test_flip_bad_arguments(call, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call(_balanced_labels(100, 10))


# --------------------------------------------------------------------------- generated CIFAR


def test_cifar10_noisy_loader_on_official_format(tmp_path: Path) -> None:
    write_cifar(tmp_path, 10, per_class=12, pixels="marked")  # 120 training images, 20 test
    data = load_cifar_noisy(tmp_path, noise=0.4, n_clean=25, seed=0)
    assert data.num_classes == 10 and data.background_class is None
    assert data.train_x.shape == (95, 3, 32, 32) and data.val_x.shape == (25, 3, 32, 32)
    assert data.test_x.shape == (20, 3, 32, 32)
    for x in (data.train_x, data.val_x, data.test_x):
        assert x.dtype == torch.float32 and x.min() >= 0.0 and x.max() <= 1.0
    # Clean set: class-balanced (25 = 2 per class + 5 classes with one more), true labels.
    counts = torch.bincount(data.val_y, minlength=10)
    assert counts.sum() == 25 and set(counts.tolist()) == {2, 3}
    assert torch.equal(data.val_y, marked_label(data.val_x))
    # Training pool: the rest, disjoint; true labels kept; exactly round(0.4 * 95) = 38 flipped.
    assert not set(fingerprints(data.train_x)) & set(fingerprints(data.val_x))
    assert len(set(fingerprints(data.train_x) + fingerprints(data.val_x))) == 120
    assert torch.equal(data.train_y_true, marked_label(data.train_x))
    assert int((data.train_y != data.train_y_true).sum()) == 38
    assert torch.equal(data.test_y, marked_label(data.test_x))  # the test set is clean
    # Channel-major rows become (C, H, W): byte 3 of a row is pixel (0, 0, 3).
    assert torch.equal((data.val_x[:, 0, 0, 3] * 255).round().long(), data.val_y)

    again = load_cifar_noisy(tmp_path, noise=0.4, n_clean=25, seed=0)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.train_y, data.train_y)
    other = load_cifar_noisy(tmp_path, noise=0.4, n_clean=25, seed=1)
    assert not torch.equal(other.val_x, data.val_x)


def test_cifar100_background_noise(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar100", 100, per_class=3, test_per_class=1, pixels="marked")
    data = load_cifar_noisy(tmp_path, num_classes=100, noise_type="background", n_clean=100)
    assert torch.bincount(data.val_y, minlength=100).tolist() == [1] * 100
    assert data.train_x.shape == (200, 3, 32, 32) and data.test_x.shape == (100, 3, 32, 32)
    bg = data.background_class
    assert bg is not None and 0 <= bg < 100
    changed = data.train_y != data.train_y_true
    assert (data.train_y[changed] == bg).all()
    assert int((data.train_y == bg).sum()) >= 80  # round(0.4 * 200) set to the background
    assert torch.equal(data.train_y_true, marked_label(data.train_x))
    fixed = load_cifar_noisy(
        tmp_path, num_classes=100, noise_type="background", n_clean=100, background=7
    )
    assert (
        fixed.background_class == 7
        and (fixed.train_y[fixed.train_y != fixed.train_y_true] == 7).all()
    )


def test_cifar_reads_python2_era_pickles_and_refuses_foreign_code(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path, 10, per_class=4, pixels="marked")
    # The official files (pickled under NumPy 1) name numpy.core, not numpy._core.
    for path in folder.iterdir():
        path.write_bytes(
            path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        )
    assert b"numpy.core.multiarray" in (folder / "data_batch_1").read_bytes()
    data = load_cifar_noisy(tmp_path, n_clean=10, noise=0.0)
    assert torch.equal(data.train_y, data.train_y_true) and len(data.train_y) == 30

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": Exploit(), "labels": []}))
    with pytest.raises(ValueError, match=r"refusing to load .*system") as error:
        load_cifar_noisy(tmp_path, n_clean=10)
    assert "data_batch_3" in str(error.value)
    (folder / "data_batch_3").write_bytes(b"\x80\x02}q\x00")  # cut short
    with pytest.raises(ValueError, match="cannot read the CIFAR batch"):
        load_cifar_noisy(tmp_path, n_clean=10)


def test_cifar_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        load_cifar_noisy(tmp_path)
    message = str(error.value)
    assert "cifar-10-batches-py/" in message and "data_batch_5" in message
    assert "dataset.download=true" in message
    write_cifar(tmp_path, 10, per_class=3, pixels="marked")
    with pytest.raises(ValueError, match=r"dataset\.n_clean=30 leaves no training images"):
        load_cifar_noisy(tmp_path, n_clean=30)
    for kwargs, message in (
        ({"num_classes": 20}, r"dataset\.num_classes must be 10 .* or 100 .*got 20"),
        ({"noise_type": "pair"}, r"dataset\.noise_type must be one of uniform, background"),
        ({"noise": -0.1}, r"dataset\.noise must be in \[0, 1\]"),
        ({"n_clean": 0}, r"dataset\.n_clean must be >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            load_cifar_noisy(tmp_path, **kwargs)

    # An imbalanced training set (one image of class 0) cannot give a balanced clean set.
    odd = tmp_path / "odd" / "cifar-10-batches-py"
    for i in range(1, 6):
        write_pickle(
            odd / f"data_batch_{i}",
            cifar_batch([0] if i == 1 else list(range(1, 10)), marker=i),
        )
    write_pickle(odd / "test_batch", cifar_batch([0, 1], marker=9))
    with pytest.raises(ValueError, match=r"dataset\.n_clean=20 takes 2 clean images of class 0 "):
        load_cifar_noisy(odd.parent, n_clean=20)
    # Labels beyond num_classes (e.g. CIFAR-100 labels in CIFAR-10 files); a wrong labels key.
    write_pickle(odd / "data_batch_1", cifar_batch([12], marker=1))
    with pytest.raises(ValueError, match=r"train labels span \[1, 12\], not \[0, 10\)"):
        load_cifar_noisy(odd.parent, n_clean=1)
    write_pickle(odd / "data_batch_1", cifar_batch([1], marker=1, label_key="fine_labels"))
    expected = r"data_batch_1: expected a dict with data and labels \(KeyError: 'labels'\)"
    with pytest.raises(ValueError, match=expected):
        load_cifar_noisy(odd.parent, n_clean=1)


def test_cifar_offline_download_fails_fast(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets.utils as tv_utils

    seen: list[float | None] = []

    def offline(url: str, root: str, filename: str, md5: str) -> None:
        seen.append(socket.getdefaulttimeout())
        raise TimeoutError("timed out")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    with pytest.raises(RuntimeError) as error:
        load_cifar_noisy(tmp_path, download=True)
    message = str(error.value)
    assert "cifar-10-python.tar.gz" in message and "timed out" in message
    assert "dataset.download=true" in message
    assert seen == [DOWNLOAD_TIMEOUT_S]
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_cifar_download_extracts_into_root(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets.utils as tv_utils

    staged = tmp_path / "made"
    write_cifar(staged, 10, per_class=4, pixels="marked")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(staged / "cifar-10-batches-py", arcname="cifar-10-batches-py")

    def fake_download(url: str, root: str, filename: str, md5: str) -> None:
        assert (filename, md5) == ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")
        (Path(root) / filename).write_bytes(archive.getvalue())

    monkeypatch.setattr(tv_utils, "download_url", fake_download)
    root = tmp_path / "data"
    data = load_cifar_noisy(root, n_clean=10, download=True)
    assert len(data.train_y) == 30
    names = sorted(p.name for p in (root / "cifar-10-batches-py").iterdir())
    assert names == ["batches.meta", "data_batch_1", "data_batch_2", "data_batch_3"] + [
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ]
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # no staging left


@pytest.mark.parametrize("padding", [0, 2, 4])
def test_random_crop_flip_matches_a_per_image_reference(padding: int) -> None:
    from metarun.data import random_crop_flip
    from metarun.data.supervised import crop_flip_offsets

    x = torch.rand(2, 6, 3, 8, 10, generator=torch.Generator().manual_seed(1))
    out = random_crop_flip(x, torch.Generator().manual_seed(7), padding)
    dy, dx, flip = crop_flip_offsets(12, padding, torch.Generator().manual_seed(7))
    flat = x.reshape(12, 3, 8, 10)
    expected = []
    for i in range(12):
        padded = torch.zeros(3, 8 + 2 * padding, 10 + 2 * padding)
        padded[:, padding : padding + 8, padding : padding + 10] = flat[i]
        crop = padded[:, dy[i] : dy[i] + 8, dx[i] : dx[i] + 10]
        expected.append(crop.flip(-1) if flip[i] else crop)
    assert torch.equal(out, torch.stack(expected).reshape(x.shape))
    if padding:  # some image moved, some was mirrored: the draws are not all trivial
        assert bool(flip.any()) and bool((dy != padding).any())
