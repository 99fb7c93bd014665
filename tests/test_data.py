"""Task samplers and Omniglot loading: shapes, ranges, determinism, splits, caching, errors."""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from metarun.data import FewShotTasks, SinusoidTasks, fixed_tasks, load_omniglot, omniglot
from metarun.tasks import TaskBatch
from metarun.testing import write_omniglot

# --------------------------------------------------------------------------- sinusoid


def test_sinusoid_shapes_and_ranges() -> None:
    tasks = SinusoidTasks(k_shot=5, k_query=7)
    batch = tasks.sample(200, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (200, 5, 1) and batch.support_y.shape == (200, 5, 1)
    assert batch.query_x.shape == (200, 7, 1) and batch.query_y.shape == (200, 7, 1)
    assert all(t.dtype == torch.float32 for t in batch.tensors())
    x = torch.cat([batch.support_x, batch.query_x], dim=1)
    y = torch.cat([batch.support_y, batch.query_y], dim=1)
    assert x.min() >= -5.0 and x.max() <= 5.0
    assert x.min() < -4.5 and x.max() > 4.5  # the whole range is covered
    assert y.abs().max() <= 5.0 + 1e-5
    assert y.abs().max() > 4.0
    assert (tasks.task_type, tasks.num_outputs, tasks.input_shape) == ("regression", 1, (1,))


def test_sinusoid_follows_amplitude_times_sin_x_minus_phase() -> None:
    # Fixed amplitude and phase: the targets are exactly known.
    tasks = SinusoidTasks(k_shot=4, k_query=4, amplitude=(2.0, 2.0), phase=(math.pi / 2,) * 2)
    batch = tasks.sample(3, torch.Generator().manual_seed(1))
    expected = 2.0 * torch.sin(batch.support_x - math.pi / 2)
    torch.testing.assert_close(batch.support_y, expected)
    torch.testing.assert_close(batch.query_y, -2.0 * torch.cos(batch.query_x))

    # Phase 0, random amplitude: y / sin(x) recovers one amplitude per task, shared by the
    # support and query sets and inside the configured range.
    tasks = SinusoidTasks(k_shot=6, k_query=6, amplitude=(0.1, 5.0), phase=(0.0, 0.0))
    batch = tasks.sample(50, torch.Generator().manual_seed(2))
    x = torch.cat([batch.support_x, batch.query_x], dim=1).double()
    y = torch.cat([batch.support_y, batch.query_y], dim=1).double()
    keep = torch.sin(x).abs() > 0.2
    ratio = torch.where(keep, y / torch.sin(x), torch.nan)
    amplitude = ratio.nanmean(dim=(1, 2))
    assert torch.nanquantile((ratio - amplitude[:, None, None]).abs().flatten(), 1.0) < 1e-4
    assert amplitude.min() >= 0.1 - 1e-4 and amplitude.max() <= 5.0 + 1e-4
    assert amplitude.std() > 0.5  # amplitudes differ between tasks


def test_sinusoid_deterministic_given_generator_only() -> None:
    tasks = SinusoidTasks()
    torch.manual_seed(123)
    a = tasks.sample(4, torch.Generator().manual_seed(7))
    torch.manual_seed(456)  # the global RNG must not matter
    state = torch.get_rng_state()
    b = tasks.sample(4, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)  # nor be consumed
    c = tasks.sample(4, torch.Generator().manual_seed(8))
    assert all(torch.equal(u, v) for u, v in zip(a.tensors(), b.tensors(), strict=True))
    assert not torch.equal(a.support_x, c.support_x)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k_shot": 0}, "dataset.k_shot must be >= 1, got 0"),
        ({"k_query": 0}, "dataset.k_query must be >= 1, got 0"),
        ({"amplitude": (5.0, 0.1)}, "dataset.amplitude"),
    ],
)
def test_sinusoid_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SinusoidTasks(**kwargs)


# --------------------------------------------------------------------------- few-shot tasks


def _coded_pool(classes: int = 10, per_class: int = 6) -> torch.Tensor:
    """``pool[c, m]`` is an image filled with ``100 * c + m``: each example knows who it is."""
    codes = 100 * torch.arange(classes)[:, None] + torch.arange(per_class)[None, :]
    return codes[:, :, None, None, None].float().expand(classes, per_class, 1, 2, 3).clone()


def _codes(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2)[..., 0].long()  # (T, S)


def test_fewshot_shapes_labels_and_distinct_classes() -> None:
    n, k, q, t = 5, 2, 3, 64
    tasks = FewShotTasks(_coded_pool(), n_way=n, k_shot=k, k_query=q)
    assert (tasks.task_type, tasks.num_outputs) == ("classification", 5)
    assert tasks.input_shape == (1, 2, 3)
    batch = tasks.sample(t, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (t, n * k, 1, 2, 3)
    assert batch.query_x.shape == (t, n * q, 1, 2, 3)
    assert batch.support_y.shape == (t, n * k) and batch.query_y.shape == (t, n * q)
    assert batch.support_y.dtype == torch.int64 and batch.query_y.dtype == torch.int64

    support, query = _codes(batch.support_x), _codes(batch.query_x)
    label_of_class_zero = set()
    for i in range(t):
        assert torch.equal(batch.support_y[i].bincount(minlength=n), torch.full((n,), k))
        assert torch.equal(batch.query_y[i].bincount(minlength=n), torch.full((n,), q))
        # Each label names one class, the same in support and query, and classes differ.
        mapping: dict[int, int] = {}
        for code, label in zip(
            torch.cat([support[i], query[i]]).tolist(),
            torch.cat([batch.support_y[i], batch.query_y[i]]).tolist(),
            strict=True,
        ):
            assert mapping.setdefault(label, code // 100) == code // 100
        assert len(set(mapping.values())) == n
        # K + Q distinct examples of each class.
        all_codes = torch.cat([support[i], query[i]])
        assert len(set(all_codes.tolist())) == n * (k + q)
        label_of_class_zero.update(lbl for lbl, cls in mapping.items() if cls == 0)
    # Labels are assigned in a random order per task, and the examples are not grouped by label.
    assert label_of_class_zero == set(range(n))
    assert any(not torch.equal(y, y.sort().values) for y in batch.support_y)
    # Every class of the pool gets used.
    assert set((support // 100).unique().tolist()) == set(range(10))


def test_fewshot_deterministic_given_generator_only() -> None:
    tasks = FewShotTasks(_coded_pool(), n_way=3, k_shot=1, k_query=2)
    torch.manual_seed(0)
    a = tasks.sample(8, torch.Generator().manual_seed(5))
    torch.manual_seed(1)
    state = torch.get_rng_state()
    b = tasks.sample(8, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    c = tasks.sample(8, torch.Generator().manual_seed(6))
    assert all(torch.equal(u, v) for u, v in zip(a.tensors(), b.tensors(), strict=True))
    assert not torch.equal(a.support_x, c.support_x)


def test_fewshot_errors_name_the_key_and_what_is_available() -> None:
    pool = _coded_pool(classes=10, per_class=6)
    with pytest.raises(ValueError, match=r"dataset\.n_way=11 exceeds the 10 classes"):
        FewShotTasks(pool, n_way=11, k_shot=1, k_query=1)
    with pytest.raises(ValueError, match=r"dataset\.k_shot \+ dataset\.k_query = 5 \+ 2 = 7") as e:
        FewShotTasks(pool, n_way=5, k_shot=5, k_query=2)
    assert "6 examples available per class" in str(e.value)
    with pytest.raises(ValueError, match=r"dataset\.k_query must be >= 1, got 0"):
        FewShotTasks(pool, n_way=5, k_shot=1, k_query=0)
    FewShotTasks(pool, n_way=10, k_shot=5, k_query=1)  # exactly at the limits is fine


def test_fixed_tasks_reproducible_and_batch_size_independent() -> None:
    source = FewShotTasks(_coded_pool(), n_way=5, k_shot=1, k_query=1)

    def run(batch_size: int, seed: int) -> list[TaskBatch]:
        torch.manual_seed(random.randrange(1000))  # global RNG state must not matter
        return list(fixed_tasks(source, num_tasks=10, batch_size=batch_size, seed=seed))

    first, again = run(4, seed=3), run(4, seed=3)
    assert [len(b) for b in first] == [4, 4, 2]
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a.tensors(), b.tensors(), strict=True))

    def joined(batches: list[TaskBatch]) -> list[torch.Tensor]:
        return [torch.cat(parts) for parts in zip(*(b.tensors() for b in batches), strict=True)]

    # The tasks themselves do not depend on how they are grouped into batches.
    assert all(
        torch.equal(u, v) for u, v in zip(joined(first), joined(run(3, seed=3)), strict=True)
    )
    assert not torch.equal(joined(first)[0], joined(run(4, seed=4))[0])
    # Tasks within one evaluation set differ from each other.
    codes = _codes(joined(first)[0])
    assert len({tuple(row.sort().values.tolist()) for row in codes}) > 5
    # Works for any source, e.g. sinusoids.
    sin = list(fixed_tasks(SinusoidTasks(), num_tasks=3, batch_size=2, seed=0))
    assert [b.support_x.shape for b in sin] == [(2, 10, 1), (1, 10, 1)]


def test_data_and_models_import_neither_hydra_nor_runner() -> None:
    code = (
        "import sys, metarun.data, metarun.models; "
        "bad = [m for m in sys.modules "
        "if m.split('.')[0] == 'hydra' or m.startswith('metarun.runner')]; "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- fake Omniglot


SMALL1 = {"Balinese": 1, "Greek": 2}
SMALL2 = {"Greek": 2, "Tagalog": 2}  # Greek is in both archives, as in the official small sets


def _load(root: Path, **kwargs) -> dict[str, torch.Tensor]:
    kwargs = {"split": "random", "fractions": (0.6, 0.2, 0.2), "image_size": 12, **kwargs}
    return load_omniglot(root, cache_dir=root / "cache", **kwargs)


def test_fake_zip_and_folder_read_the_same_and_dedup(tmp_path: Path) -> None:
    for stem, alphabets in (("small1", SMALL1), ("small2", SMALL2)):
        write_omniglot(tmp_path / "zips", f"images_background_{stem}", alphabets, as_zip=True)
        write_omniglot(tmp_path / "dirs", f"images_background_{stem}", alphabets, as_zip=False)
    from_zip = _load(tmp_path / "zips", rotations=False)
    from_dir = _load(tmp_path / "dirs", rotations=False)
    # 1 + 2 + 2 + 2 characters, the two Greek ones counted once: 5 -> 3/1/1.
    assert {k: v.shape[0] for k, v in from_zip.items()} == {"train": 3, "val": 1, "test": 1}
    assert from_zip["train"].shape[1:] == (3, 1, 12, 12)
    for split in ("train", "val", "test"):
        assert torch.equal(from_zip[split], from_dir[split])
    # Without resizing the 1-bit images come back exactly inverted: strokes 1, background 0.
    images = torch.cat(list(from_zip.values()))
    assert set(images.unique().tolist()) == {0.0, 1.0}
    assert images[:, :, 0, 0, :].sum() == 0  # the top row is background
    assert torch.all(images[:, :, 0, 1, 0] == 1) and torch.all(images[:, :, 0, 10, 0] == 1)
    # Five different characters (bar lengths), every drawer of a character alike.
    assert len({tuple(img[0].flatten().tolist()) for img in images}) == 5
    assert torch.equal(images[:, :1].expand_as(images), images)


def test_fake_rotations_make_four_classes_per_character(tmp_path: Path) -> None:
    write_omniglot(tmp_path, "images_background", {"A": 5, "B": 5})
    plain = _load(tmp_path, rotations=False)
    rotated = _load(tmp_path, rotations=True)
    for split, pool in plain.items():
        c = pool.shape[0]
        assert rotated[split].shape == (4 * c, *pool.shape[1:])
        for r in range(4):
            expected = torch.rot90(pool, r, dims=(-2, -1))
            assert torch.equal(rotated[split][r * c : (r + 1) * c], expected)
    assert not torch.equal(rotated["train"][0], rotated["train"][plain["train"].shape[0]])


def test_fake_cache_is_reused_and_invalidated(tmp_path: Path, monkeypatch) -> None:
    write_omniglot(tmp_path, "images_background_small1", SMALL1)
    calls = []
    decode = omniglot._decode_image

    def counting(data: bytes, image_size: int) -> bytes:
        calls.append(image_size)
        return decode(data, image_size)

    monkeypatch.setattr(omniglot, "_decode_image", counting)
    first = _load(tmp_path, fractions=(0.34, 0.33, 0.33))
    assert len(calls) == 3 * 3  # 3 characters x 3 drawers
    assert len(list((tmp_path / "cache").glob("omniglot_*.pt"))) == 1
    assert not list((tmp_path / "cache").glob(".*"))  # no temp file left behind
    second = _load(tmp_path, fractions=(0.34, 0.33, 0.33))
    assert len(calls) == 9  # served from the cache
    assert all(torch.equal(first[k], second[k]) for k in first)
    # Another image size is another cache entry; a changed archive invalidates its entry.
    _load(tmp_path, fractions=(0.34, 0.33, 0.33), image_size=6)
    assert len(calls) == 18
    archive = tmp_path / "images_background_small1.zip"
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _load(tmp_path, fractions=(0.34, 0.33, 0.33))
    assert len(calls) == 27


def test_unwritable_cache_dir_only_warns(tmp_path: Path, caplog) -> None:
    write_omniglot(tmp_path, "images_background_small1", SMALL1)
    (tmp_path / "a_file").write_text("")
    blocked = tmp_path / "a_file" / "cache"  # cannot be created, even by root
    out = load_omniglot(
        tmp_path, split="random", fractions=(0.34, 0.33, 0.33), image_size=12, cache_dir=blocked
    )
    assert sum(v.shape[0] for v in out.values()) == 3 * 4
    assert "could not write the omniglot cache" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "images_background_small1.zip"]


def test_fake_lake_split_uses_alphabet_groups(tmp_path: Path) -> None:
    write_omniglot(tmp_path, "images_background", {"A": 10, "B": 10})
    write_omniglot(tmp_path, "images_evaluation", {"Z": 3})
    out = _load(tmp_path, split="lake", rotations=False)
    assert {k: v.shape[0] for k, v in out.items()} == {"train": 18, "val": 2, "test": 3}
    # The evaluation alphabet is the test set: its characters 1, 2, 3 (row-1 bar lengths).
    assert sorted(int(img[0, 0, 1].sum()) for img in out["test"]) == [1, 2, 3]


def test_fake_finn_split_sizes_and_order(tmp_path: Path) -> None:
    # 1623 one-drawer characters (964 background + 659 evaluation), tiny images.
    background = {f"Bg{i:02d}": 32 for i in range(30)}
    background["Bg29"] = 964 - 29 * 32
    evaluation = {f"Ev{i:02d}": 33 for i in range(20)}
    evaluation["Ev19"] = 659 - 19 * 33
    write_omniglot(tmp_path, "images_background", background, drawers=1, side=4)
    write_omniglot(tmp_path, "images_evaluation", evaluation, drawers=1, side=4)
    out = load_omniglot(tmp_path, split="finn", image_size=4, cache_dir=tmp_path / "cache")
    assert {k: v.shape for k, v in out.items()} == {
        "train": (4400, 1, 1, 4, 4),
        "val": (400, 1, 1, 4, 4),
        "test": (1692, 1, 1, 4, 4),
    }
    # The split is sorted (alphabet, character) shuffled by random.Random(1): check the test set.
    keys = sorted(
        (alphabet, f"character{c:02d}")
        for alphabets in (background, evaluation)
        for alphabet, count in alphabets.items()
        for c in range(1, count + 1)
    )
    random.Random(1).shuffle(keys)
    plain = load_omniglot(
        tmp_path, split="finn", image_size=4, rotations=False, cache_dir=tmp_path / "cache"
    )
    reference = _load_reference(tmp_path, keys[1200:])
    assert torch.equal(plain["test"], reference)
    assert torch.equal(out["test"][:423], plain["test"])


def _load_reference(root: Path, keys: list[tuple[str, str]]) -> torch.Tensor:
    """Decode the given characters straight from the fake archives, independently of the loader."""
    data = {}
    for stem in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(root / f"{stem}.zip") as archive:
            for name in archive.namelist():
                alphabet, character = name.split("/")[1:3]
                data[alphabet, character] = archive.read(name)
    images = []
    for key in keys:
        with Image.open(io.BytesIO(data[key])) as image:
            grey = torch.frombuffer(bytearray(image.convert("L").tobytes()), dtype=torch.uint8)
        images.append(1.0 - grey.view(1, 1, 4, 4).float() / 255.0)
    return torch.stack(images)


def test_bad_fractions_and_split_name(tmp_path: Path) -> None:
    write_omniglot(tmp_path, "images_background_small1", SMALL1)
    with pytest.raises(ValueError, match=r"dataset\.fractions=\(0\.98, 0\.01, 0\.01\).*no class"):
        _load(tmp_path, fractions=(0.98, 0.01, 0.01))
    with pytest.raises(ValueError, match=r"dataset\.fractions must be 3 non-negative"):
        _load(tmp_path, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"dataset\.split must be one of finn, lake, random"):
        _load(tmp_path, split="vinyals")


# --------------------------------------------------------------------------- offline / download


def test_missing_data_error_names_key_path_files_and_fix(tmp_path: Path) -> None:
    root = tmp_path / "nothing_here"
    with pytest.raises(FileNotFoundError) as error:
        load_omniglot(root, split="random", cache_dir=tmp_path / "cache")
    message = str(error.value)
    for needle in (
        "dataset.root=",
        str(root),
        "images_background.zip",
        "images_evaluation.zip",
        "images_background_small1.zip",
        "dataset.download=true",
    ):
        assert needle in message


def test_offline_download_fails_fast_with_clear_error(tmp_path: Path, monkeypatch) -> None:
    seen = []

    # torchvision's downloader opens Requests without a timeout argument: the socket default is
    # what bounds the wait.
    def offline(request: urllib.request.Request | str, timeout: float | None = None):
        seen.append((_url(request), socket.getdefaulttimeout()))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "data"
    with pytest.raises(RuntimeError) as error:
        load_omniglot(root, split="finn", download=True, cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "dataset.root=" in message and str(root) in message
    assert "images_background.zip" in message and "dataset.download" in message
    assert seen[0][0] == (
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background.zip"
    )
    assert seen[0][1] is not None and 0 < seen[0][1] <= 60  # never waits forever
    assert list(root.iterdir()) == []  # no partial file left behind


def _url(request: urllib.request.Request | str) -> str:
    return request.full_url if isinstance(request, urllib.request.Request) else request


class _Response(io.BytesIO):
    """What torchvision's downloader reads of an HTTP response."""

    def __init__(self, url: str, data: bytes) -> None:
        super().__init__(data)
        self.url, self.length = url, len(data)


def _serve(monkeypatch, files: dict[str, bytes]) -> None:
    def fake_urlopen(request: urllib.request.Request | str, timeout: float | None = None):
        assert socket.getdefaulttimeout() is not None
        url = _url(request)
        return _Response(url, files[url.rsplit("/", 1)[-1]])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)


def test_download_checks_md5_and_writes_atomically(tmp_path: Path, monkeypatch) -> None:
    built = tmp_path / "built"
    write_omniglot(built, "images_background", {"A": 10})
    write_omniglot(built, "images_evaluation", {"B": 2})
    payload = {
        n: (built / n).read_bytes() for n in ("images_background.zip", "images_evaluation.zip")
    }
    _serve(monkeypatch, payload)

    root = tmp_path / "data"
    with pytest.raises(RuntimeError, match="MD5"):  # the official checksums do not match fakes
        load_omniglot(root, split="lake", download=True, cache_dir=tmp_path / "cache")
    assert list(root.iterdir()) == []

    md5 = {n: hashlib.md5(data).hexdigest() for n, data in payload.items()}
    monkeypatch.setattr(omniglot, "DOWNLOAD_MD5", md5)
    out = load_omniglot(
        root,
        split="lake",
        download=True,
        image_size=12,
        rotations=False,
        cache_dir=tmp_path / "cache",
    )
    assert sorted(p.name for p in root.iterdir()) == sorted(payload)
    assert {k: v.shape[0] for k, v in out.items()} == {"train": 9, "val": 1, "test": 2}


# --------------------------------------------------------------------------- real Omniglot


@pytest.fixture(scope="module")
def real_omniglot(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """Decode the two official minimal background sets once for the whole module."""
    data = os.environ.get("METARUN_DATA")
    if not data:
        pytest.skip("METARUN_DATA is unset: real-Omniglot tests read $METARUN_DATA/omniglot/")
    root = Path(data) / "omniglot"
    cache = tmp_path_factory.mktemp("omniglot_cache")
    return root, cache, load_omniglot(root, split="random", cache_dir=cache)


def test_real_random_split_classes_and_pixels(real_omniglot) -> None:
    _, _, out = real_omniglot
    assert sum(v.shape[0] for v in out.values()) == 242 * 4
    assert {k: v.shape[0] for k, v in out.items()} == {"train": 676, "val": 148, "test": 144}
    for pool in out.values():
        assert pool.shape[1:] == (20, 1, 28, 28) and pool.dtype == torch.float32
        assert pool.min() >= 0.0 and pool.max() <= 1.0
        assert pool.max() == 1.0  # solid strokes
        # Inverted: mostly background (0) with thin strokes, borders empty.
        assert pool.mean() < 0.2
        assert pool[..., 0, :].mean() < 0.01 and pool[..., :, 0].mean() < 0.01
    # Rotation classes are rotations of the first quarter.
    train = out["train"]
    c = train.shape[0] // 4
    assert torch.equal(train[2 * c : 3 * c], torch.rot90(train[:c], 2, dims=(-2, -1)))

    # No character in two splits.
    def fingerprints(pool: torch.Tensor) -> set[bytes]:
        return {img.numpy().tobytes() for img in pool[: pool.shape[0] // 4, 0]}

    tr, va, te = (fingerprints(out[k]) for k in ("train", "val", "test"))
    assert len(tr) == 169 and not (tr & va) and not (tr & te) and not (va & te)


def test_real_second_load_hits_cache_without_decoding(real_omniglot, monkeypatch) -> None:
    root, cache, first = real_omniglot

    def no_decoding(data: bytes, image_size: int) -> bytes:
        raise AssertionError("decoded a PNG although the cache was warm")

    monkeypatch.setattr(omniglot, "_decode_image", no_decoding)
    again = load_omniglot(root, split="random", cache_dir=cache)
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = load_omniglot(root, split="random", seed=2, rotations=False, cache_dir=cache)
    assert sum(v.shape[0] for v in other.values()) == 242
    assert not torch.equal(other["test"], first["test"][: other["test"].shape[0]])


@pytest.mark.parametrize(
    ("split", "needles"),
    [
        ("finn", ["images_background.zip", "images_evaluation.zip", "dataset.split=random"]),
        ("lake", ["images_evaluation.zip", "dataset.split=random"]),
    ],
)
def test_real_minimal_sets_reject_finn_and_lake(real_omniglot, split, needles, monkeypatch) -> None:
    root, cache, _ = real_omniglot
    monkeypatch.setattr(omniglot, "_decode_image", None)  # must fail before decoding anything
    with pytest.raises(ValueError) as error:
        load_omniglot(root, split=split, cache_dir=cache)
    message = str(error.value)
    assert f"dataset.split={split}" in message and "dataset.download=true" in message
    assert str(root) in message
    for needle in needles:
        assert needle in message


def test_real_fewshot_tasks_from_omniglot(real_omniglot) -> None:
    _, _, out = real_omniglot
    tasks = FewShotTasks(out["test"], n_way=20, k_shot=1, k_query=19)
    batch = tasks.sample(2, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (2, 20, 1, 28, 28)
    assert batch.query_x.shape == (2, 380, 1, 28, 28)
    with pytest.raises(ValueError, match=r"dataset\.k_shot \+ dataset\.k_query = 1 \+ 20 = 21"):
        FewShotTasks(out["test"], n_way=5, k_shot=1, k_query=20)
    with pytest.raises(ValueError, match=r"dataset\.n_way=145 exceeds the 144 classes"):
        FewShotTasks(out["test"], n_way=145, k_shot=1, k_query=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fewshot_pool_on_gpu_matches_cpu() -> None:
    pool = _coded_pool()
    cpu = FewShotTasks(pool, n_way=5, k_shot=1, k_query=2).sample(
        4, torch.Generator().manual_seed(0)
    )
    gpu = FewShotTasks(pool.cuda(), n_way=5, k_shot=1, k_query=2).sample(
        4, torch.Generator().manual_seed(0)
    )
    assert all(
        g.is_cuda and torch.equal(g.cpu(), c)
        for g, c in zip(gpu.tensors(), cpu.tensors(), strict=True)
    )
