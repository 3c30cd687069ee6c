"""Fuzzing the loaders of files a user may receive (issue #20).

The domain pair (``NAME.safetensors`` + ``NAME.json``), a run's ``config.yaml`` (as
``--config``), an exported model's JSON sidecar, and images in a class folder, each damaged
the ways files get damaged or forged: truncated, bytes flipped, a safetensors header declaring
huge sizes or offsets out of the file, tensors of the wrong dtype or shape, keys missing or
extra, values of the wrong type. Each case either loads (a flipped byte inside a class name is
still a valid file) or is refused with one line ``da3: error: FILE: ...`` naming the file, exit
status 2, no traceback; and the whole run stays within a bounded amount of memory (a header
declaring 100 GB is never allocated).

The domain pair and the settings file go through the real command line (``da3 predict``,
``da3 train``); the sidecar and the images through their loaders (``read_sidecar``,
``load_image``), which is what the commands call. Hypothesis draws the damage.

In CI each target runs a fixed, derandomised set of cases (a few hundred in all, well under a
minute). ``DA3_FUZZ_EXAMPLES=N`` runs N random cases per target instead, and with
``DA3_FUZZ_REPORT=FILE`` the count and time per target are written there:
``benchmarks/fuzz_loaders.py`` does both and records the campaign.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import struct
import time
import warnings
import zlib
from collections import Counter
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save

from da3.cli import silence_pil_warnings
from da3.data.folder import load_image
from da3.errors import Da3Error
from da3.export import read_sidecar
from da3.export.core import domain_metadata
from da3.io import SAFETENSORS_DTYPES
from test_cli import cli, make_folder, train_args

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

CAMPAIGN = int(os.environ.get("DA3_FUZZ_EXAMPLES", "0"))
CASES: Counter = Counter()  # (target, outcome) -> cases
SECONDS: Counter = Counter()
PEAK: Counter = Counter()  # target -> most memory one case took, bytes
CASE_MEMORY = 2**30  # what one case may take at most, over what the process held before


def fuzz(ci_examples: int):
    """Hypothesis settings: ``ci_examples`` derandomised cases, or the campaign's count."""
    return settings(
        max_examples=CAMPAIGN or ci_examples,
        derandomize=not CAMPAIGN,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    report = os.environ.get("DA3_FUZZ_REPORT")
    if report:
        old = json.loads(Path(report).read_text()) if Path(report).is_file() else {}
        for target in SECONDS:
            outcomes = {o: n for (t, o), n in CASES.items() if t == target}
            old[target] = {
                "cases": sum(outcomes.values()),
                **outcomes,
                "seconds": round(SECONDS[target], 1),
                "largest_case_mib": round(PEAK[target] / 2**20) if PEAK else None,
            }
        Path(report).write_text(json.dumps(old, indent=1) + "\n")


def _status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(text.split(f"{field}:", 1)[1].split()[0]) * 1024


def _reset_peak() -> int | None:
    """Linux: reset this process's peak memory (VmHWM) to what it holds now, and return
    that; None where it cannot be (then a case's memory is not measured)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_bytes("VmRSS")
    except (OSError, IndexError, ValueError):
        return None


class case:
    """Counts and times one case of ``target``; a case must finish in seconds, not hang.
    The body sets ``outcome`` (``loaded`` or ``refused``)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.outcome = "?"

    def __enter__(self):
        self.held = _reset_peak()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, kind, *exc) -> None:
        dt = time.perf_counter() - self.t0
        if kind is not None and not issubclass(kind, AssertionError):
            return  # hypothesis gave up on drawing this case: not one
        CASES[self.target, "finding" if kind else self.outcome] += 1
        SECONDS[self.target] += dt
        assert dt < 30, f"{self.target}: one case took {dt:.0f}s"
        if self.held is not None:
            took = _status_bytes("VmHWM") - self.held
            PEAK[self.target] = max(PEAK[self.target], took)
            assert took < CASE_MEMORY, f"{self.target}: one case took {took / 2**20:.0f} MiB"


def refused_cleanly(err: str, *names: str) -> str:
    """The one line of a refusal, checked: ``da3: error:``, naming one of ``names``."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("da3: error: "), err
    assert any(n in lines[0] for n in names), (names, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------
# damage, drawn by hypothesis


def byte_damage(draw, data: bytes, hot: int = 0) -> bytes:
    """``data`` truncated, with bytes flipped, inserted or cut; ``hot``: length of the
    head (a header) where half the damage lands."""
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "cut"]))
    where = st.integers(0, len(data) - 1)
    if hot:
        where = st.one_of(st.integers(0, min(hot, len(data)) - 1), where)
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        at = draw(where) % max(1, len(out))
        if kind == "flip":
            out[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del out[at : at + draw(st.integers(1, 64))]
    return bytes(out)


HUGE = [2**31, 2**32 + 1, 2**40, 100 * 2**30, 2**63 - 1, 2**63, 2**64 - 1]
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([*HUGE, -1, 0, 1, 3, 2, 1e308, -0.0]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["", "x" * 5000, "\x00", "../../etc/passwd", "imagenet", "random"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _locations(obj, path=()):
    """Every (path) inside a JSON value: dict keys and list indices."""
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _locations(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _locations(v, (*path, i))


def json_damage(draw, obj: dict, values=json_values) -> dict:
    """``obj`` (a JSON object) with 1-3 edits: a value replaced by one of another type or
    a huge one, a key removed, an extra key added."""
    obj = json.loads(json.dumps(obj))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _locations(obj) if p]
        kind = draw(st.sampled_from(["replace", "remove", "add"]))
        if not paths:
            kind = "add"
        if kind == "add":
            parents = [p for p in _locations(obj) if isinstance(_get(obj, p), dict)]
            parent = _get(obj, draw(st.sampled_from(parents)))
            parent[draw(st.text(min_size=1, max_size=12))] = copy.deepcopy(draw(values))
            continue
        path = draw(st.sampled_from(paths))
        parent = _get(obj, path[:-1])
        if kind == "remove":
            del parent[path[-1]]
        else:  # a copy: sampled_from hands out the same object every time
            parent[path[-1]] = copy.deepcopy(draw(values))
    return obj


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


# ---------------------------------------------------------------------------------------
# the domain pair, through `da3 predict`


class Fixture(dict):
    """A fixture's files, shown briefly in a failure report (not megabytes of bytes)."""

    def __repr__(self) -> str:
        return f"<{', '.join(self)}>"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DA3_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """Two trained domains: 'toy' (da3: float tensors) and 'pb' (piggyback: uint8 masks)."""
    base = tmp_path_factory.mktemp("fuzz")
    data = make_folder(base / "data", per_class=6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DA3_CACHE_DIR", str(base / "cache"))
        assert cli(*train_args("toy", data, base / "golden")) == 0
        assert cli(*train_args("pb", data, base / "golden", "--method", "piggyback")) == 0
    return Fixture(
        golden=base / "golden",
        scratch=base / "scratch",
        image=data / "red" / "00.png",
        files={
            n: {s: (base / "golden" / f"{n}{s}").read_bytes() for s in (".safetensors", ".json")}
            for n in ("toy", "pb")
        },
    )


def _predict(domains, name: str, tensors: bytes, meta: bytes, capsys) -> str:
    """Write the pair into an empty store and load it with ``da3 predict``."""
    store = domains["scratch"]
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir()
    (store / f"{name}.safetensors").write_bytes(tensors)
    (store / f"{name}.json").write_bytes(meta)
    capsys.readouterr()
    code = cli("predict", domains["image"], "--domain", name, "--store", store)
    out, err = capsys.readouterr()
    if code == 0:
        assert err.strip() == "" and out.startswith(str(domains["image"])), (out, err)
        return "loaded"
    assert code == 2, (code, err)
    refused_cleanly(err, f"{name}.json", f"{name}.safetensors")
    return "refused"


def _header(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _with_header(header, data: bytes, declared: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def header_damage(draw, blob: bytes) -> bytes:
    """A safetensors file whose header lies: a length past the file, a huge shape, offsets
    out of the data, an unknown dtype, a tensor missing or extra, metadata not strings."""
    header, data = _header(blob)
    kind = draw(
        st.sampled_from(["length", "dtype", "shape", "offsets", "drop", "extra", "meta", "any"])
    )
    if kind == "length":
        declared = draw(st.sampled_from(HUGE) | st.integers(0, 2**64 - 1))
        return _with_header(header, data, declared)
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    entry = header[name]
    if kind == "dtype":
        entry["dtype"] = draw(st.sampled_from([*SAFETENSORS_DTYPES, "F4", "X"]) | json_values)
    elif kind == "shape":
        entry["shape"] = draw(
            st.lists(st.sampled_from(HUGE) | st.integers(-2, 2**20), max_size=40) | json_values
        )
    elif kind == "offsets":
        entry["data_offsets"] = draw(
            st.lists(st.sampled_from(HUGE) | st.integers(-2, len(data) + 2), max_size=3)
            | json_values
        )
    elif kind == "drop":
        del header[name]
    elif kind == "extra":
        header[draw(st.text(min_size=1, max_size=20))] = dict(entry)
    elif kind == "meta":
        header["__metadata__"] = draw(json_values)
    else:
        header = draw(json_values)
    return _with_header(header, data)


RETYPE = [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool]


def tensor_damage(draw, blob: bytes) -> tuple[bytes, bool]:
    """A well-formed safetensors file (same build id) with tensors of the wrong dtype or
    shape, missing or extra, or not finite; and whether the JSON should record its SHA-256
    (true: a consistent pair from a faulty writer; false: a file from before the digest)."""
    header, _ = _header(blob)
    tensors = load_file_from_bytes(blob)
    name = draw(st.sampled_from(sorted(tensors)))
    t = tensors[name]
    kind = draw(st.sampled_from(["dtype", "reshape", "resize", "drop", "extra", "nan"]))
    if kind == "dtype":
        tensors[name] = t.to(draw(st.sampled_from([d for d in RETYPE if d != t.dtype])))
    elif kind == "reshape":
        tensors[name] = t.reshape(-1) if t.dim() != 1 else t.reshape(1, -1)
    elif kind == "resize":
        shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=4))
        tensors[name] = torch.zeros(shape, dtype=t.dtype)
    elif kind == "drop":
        del tensors[name]
    elif kind == "extra":
        tensors[draw(st.text(min_size=1, max_size=20))] = torch.ones(3)
    elif t.is_floating_point():
        tensors[name] = torch.full_like(t, draw(st.sampled_from([math.nan, math.inf])))
    return save(tensors, metadata=header.get("__metadata__")), draw(st.booleans())


def load_file_from_bytes(blob: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(blob)


@fuzz(60)
@given(data=st.data())
def test_domain_tensors_file(domains, capsys, data):
    name = data.draw(st.sampled_from(["toy", "pb"]))
    tensors, meta = domains["files"][name][".safetensors"], domains["files"][name][".json"]
    (hot,) = struct.unpack("<Q", tensors[:8])
    kind = data.draw(st.sampled_from(["bytes", "header", "tensors"]))
    with case("domain .safetensors") as c:
        if kind == "bytes":
            tensors = byte_damage(data.draw, tensors, hot=8 + hot)
        elif kind == "header":
            tensors = header_damage(data.draw, tensors)
        else:
            tensors, record = tensor_damage(data.draw, tensors)
            doc = json.loads(meta)
            doc.pop("tensors_sha256")
            if record:
                from hashlib import sha256

                doc["tensors_sha256"] = sha256(tensors).hexdigest()
            meta = json.dumps(doc).encode()
        c.outcome = _predict(domains, name, tensors, meta, capsys)


# Edits aimed at what the loader interprets: huge sizes in the method's config, class lists
# of another length or type, backbone records pointing at files, other methods.
domain_values = st.one_of(
    json_values,
    st.sampled_from(
        [
            {"name": "efficientnet_lite0", "weights": "/etc/passwd", "fingerprint": "0"},
            {"name": "mobilenet_v2", "weights": "random", "fingerprint": "0"},
            {"name": "efficientnet_lite0", "weights": "file:w.pth", "fingerprint": "0"},
            ["a"] * 2,
            [str(i) for i in range(1000)],
            "linear",
            "finetune",
            "bias",
            {"width": 10**12},
            {"reduction": 10**15, "max_hidden": 10**12, "hidden_ratio": 1e12},
            {"blocks": "0-999999999"},
        ]
    ),
)


@fuzz(60)
@given(data=st.data())
def test_domain_json_file(domains, capsys, data):
    name = data.draw(st.sampled_from(["toy", "pb"]))
    tensors, meta = domains["files"][name][".safetensors"], domains["files"][name][".json"]
    with case("domain .json") as c:
        if data.draw(st.booleans()):
            meta = byte_damage(data.draw, meta)
        else:
            meta = json.dumps(json_damage(data.draw, json.loads(meta), domain_values)).encode()
        c.outcome = _predict(domains, name, tensors, meta, capsys)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["config"].update(width=10**12, max_hidden=10**12, hidden_ratio=1e9),
        lambda m: m["config"].update(reduction=10**15),  # shapes as before: it loads
        lambda m: m["config"].update(blocks="0-999999999"),  # was a list of 10^9 indices
        lambda m: m.update(classes=[str(i) for i in range(2_000_000)]),
        lambda m: m["backbone"].update(weights="/dev/zero"),
        lambda m: m.update(image_size=10**9),
        lambda m: m.update(method="finetune"),
    ],
    ids=[
        "huge adaptor",
        "huge reduction",
        "huge block range",
        "2M classes",
        "weights path",
        "image size",
        "method",
    ],
)
def test_domain_json_declaring_a_huge_model_is_refused_before_it_is_built(domains, capsys, edit):
    """A class list or config declaring gigabytes of tensors: refused for not fitting the
    tensors file, the model built only on the meta device (no memory)."""
    meta = json.loads(domains["files"]["toy"][".json"])
    edit(meta)
    held = _reset_peak()
    outcome = _predict(
        domains, "toy", domains["files"]["toy"][".safetensors"], json.dumps(meta).encode(), capsys
    )
    assert outcome == "refused" or meta["config"].get("reduction") == 10**15
    if held is not None:  # the 2M class names themselves are ~150 MB of Python strings
        assert _status_bytes("VmHWM") - held < 512 * 2**20


def test_tensors_header_declaring_100_gb_is_not_allocated(domains, capsys):
    header, data = _header(domains["files"]["toy"][".safetensors"])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [25 * 2**30]  # 100 GB of float32
    header[name]["data_offsets"] = [0, 100 * 2**30]
    for blob in (_with_header(header, data), _with_header(header, data, 100 * 2**30)):
        held = _reset_peak()
        assert _predict(domains, "toy", blob, domains["files"]["toy"][".json"], capsys) == "refused"
        if held is not None:
            assert _status_bytes("VmHWM") - held < 256 * 2**20


# ---------------------------------------------------------------------------------------
# the run's config.yaml, through `da3 train --config`

settings_keys = st.sampled_from(
    [
        "domain",
        "data",
        "method",
        "backbone",
        "weights",
        "image_size",
        "epochs",
        "batch_size",
        "seed",
        "augment",
        "device",
        "cache_features",
        "cache_dtype",
        "reduction",
        "blocks",
        "hidden_ratio",
        "gates",
        "lr",
        "config",
        "image-size",
        "bogus",
    ]
) | st.text(max_size=10)
yaml_values = json_values | st.sampled_from([math.nan, math.inf, -math.inf, "cuda", "none"])


@pytest.fixture(scope="module")
def settings_files(domains, tmp_path_factory):
    base = tmp_path_factory.mktemp("yaml")
    run_config = (domains["golden"] / "runs" / "toy" / "config.yaml").read_bytes()
    return Fixture(base=base, seeds=[run_config, b"epochs: 2\nreduction: 2\naugment: false\n"])


def _train_with(settings_files, text: bytes, capsys) -> str:
    base = settings_files["base"]
    cfg, missing = base / "settings.yaml", base / "no-such-data"
    cfg.write_bytes(text)
    capsys.readouterr()
    argv = ["train", "--domain", "fz", "--data", missing, "--config", cfg]
    code = cli(*argv, "--quiet", "--store", base / "store")
    err = capsys.readouterr().err
    assert code == 2, err  # a setting is refused, or (all accepted) the data is missing
    line = refused_cleanly(err, str(cfg), str(missing))
    return "refused" if str(cfg) in line else "loaded"


BILLION_LAUGHS = (
    b"a: &a [x, x, x, x, x, x, x, x, x]\n"
    + b"".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n".encode()
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + b"epochs: *i\n"
)


@fuzz(100)
@given(data=st.data())
@example(data=BILLION_LAUGHS)
@example(data=b"[" * 100_000)
@example(data=b"!!python/object/apply:os.system ['echo hi']\n")
@example(data=b"epochs: !!binary aGVsbG8=\n")
@example(data=b"\xff\xfe\x00e\x00p")
@example(data=b"epochs: 1\n" * 200_000)  # 2 MB
@example(data=b"a: 1\n---\nb: 2\n")
@example(data=b"config: 5\n")
@example(data=b"config: {width: [1, 2]}\n")
@example(data=b'data: "a\\0b"\nweights: "x\\0y"\n')
@example(data=b"epochs: 1e400\nseed: .nan\n")
@example(data=b"? [a, b]\n: 1\n")
def test_settings_file(settings_files, capsys, data):
    with case("run config.yaml") as c:
        if isinstance(data, bytes):
            text = data
        elif data.draw(st.booleans()):
            text = byte_damage(data.draw, data.draw(st.sampled_from(settings_files["seeds"])))
        else:
            doc = data.draw(
                st.dictionaries(
                    settings_keys,
                    yaml_values | st.dictionaries(settings_keys, yaml_values, max_size=3),
                    max_size=6,
                )
            )
            text = yaml.safe_dump(doc, allow_unicode=True).encode()
        c.outcome = _train_with(settings_files, text, capsys)


@pytest.mark.parametrize("data", ["x" * 5000, "a/" * 3000, "\x00", 7, True, None, ""])
def test_settings_file_data_value(settings_files, capsys, data):
    """The one value the fuzzer above leaves to ``--data``: from the file, a name no file
    system takes is one line too."""
    cfg = settings_files["base"] / "data.yaml"
    cfg.write_text(yaml.safe_dump({"data": data, "epochs": 1}))
    capsys.readouterr()
    code = cli("train", "--domain", "fz", "--config", cfg, "--store", settings_files["base"])
    assert code == 2
    refused_cleanly(capsys.readouterr().err, str(cfg), "--data is required")


def test_run_config_yaml_reads_back_as_settings(domains, capsys, tmp_path):
    """The config.yaml a run wrote is a settings file itself (its ``config`` holds the
    method's keys): with another name it trains the same domain again."""
    cfg = domains["golden"] / "runs" / "toy" / "config.yaml"
    store = tmp_path / "store"
    assert cli("train", "--domain", "again", "--config", cfg, "--quiet", "--store", store) == 0
    first = json.loads(domains["files"]["toy"][".json"])
    again = json.loads((store / "again.json").read_text())
    assert again["config"] == first["config"] and again["train"] == first["train"]


# ---------------------------------------------------------------------------------------
# the exported model's sidecar, through read_sidecar


def _sidecar() -> dict:
    meta = domain_metadata(
        "toy",
        "da3",
        ["blue", "green", "red"],
        32,
        {"mean": [0.498] * 3, "std": [0.502] * 3, "input_size": 224},
        {"name": "efficientnet_lite0", "weights": "random", "fingerprint": "f" * 64},
        source={"store": "/s", "build_id": "0" * 16, "metrics": {}},
    )
    meta |= {"gates": "none", "export_format": "onnx", "gated_blocks": 0}
    meta["verification"] = {"samples": 16, "max_abs_diff": 1e-6, "tolerance": 1e-4}
    return meta


def test_sidecar_reads(tmp_path):
    path = tmp_path / "model.onnx.json"
    path.write_text(json.dumps(_sidecar()))
    assert read_sidecar(tmp_path / "model.onnx") == read_sidecar(path) == _sidecar()


@fuzz(200)
@given(data=st.data())
def test_sidecar(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "model.onnx.json"
    good = json.dumps(_sidecar(), indent=2).encode()
    with case("export sidecar") as c:
        if data.draw(st.booleans()):
            text = byte_damage(data.draw, good)
        else:
            text = json.dumps(json_damage(data.draw, _sidecar())).encode()
        path.write_bytes(text)
        try:
            meta = read_sidecar(path.with_suffix(""))  # the model's path finds its sidecar
        except Da3Error as err:
            refused_cleanly(f"da3: error: {err}", str(path))
            c.outcome = "refused"
        else:
            assert isinstance(meta["classes"], list) and meta["input"]["image_size"] >= 8
            c.outcome = "loaded"


# ---------------------------------------------------------------------------------------
# images in a class folder, through load_image


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width: int, height: int) -> bytes:
    """A valid-looking PNG of a few dozen bytes whose header declares width x height."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _seed_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8))
    out = {}
    for fmt, ext, image in [
        ("PNG", ".png", rgb),
        ("PNG", ".png", rgb.convert("RGBA")),
        ("PNG", ".png", rgb.convert("P")),
        ("PNG", ".png", Image.fromarray(rng.integers(0, 65535, (9, 9), dtype=np.uint16))),
        ("JPEG", ".jpg", rgb),
        ("BMP", ".bmp", rgb),
        ("GIF", ".gif", rgb.convert("P")),
        ("TIFF", ".tif", rgb),
        ("WEBP", ".webp", rgb),
        ("PPM", ".ppm", rgb),
    ]:
        buf = BytesIO()
        image.save(buf, fmt)
        out[f"{fmt.lower()}-{image.mode}{ext}"] = buf.getvalue()
    return out


SEED_IMAGES = _seed_images()


def _load(path: Path) -> str:
    """``load_image`` as ``da3`` runs it: no warning may reach stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_pil_warnings()
        try:
            array = load_image(path, 32)
        except Da3Error as err:
            refused_cleanly(f"da3: error: {err}", str(path))
            outcome = "refused"
        else:
            assert array.shape == (3, 32, 32) and array.dtype == np.uint8
            outcome = "loaded"
    assert not caught, [str(w.message) for w in caught]
    return outcome


@fuzz(200)
@given(data=st.data())
def test_image_file(tmp_path_factory, data):
    name = data.draw(st.sampled_from(sorted(SEED_IMAGES)))
    path = tmp_path_factory.getbasetemp() / f"fuzz-{name}"
    with case("class-folder image") as c:
        if data.draw(st.integers(0, 5)) == 0:
            w = data.draw(
                st.sampled_from([0, 1, 50_000, 200_000, 2**31 - 1]) | st.integers(0, 2**32 - 1)
            )
            h = data.draw(
                st.sampled_from([1, 9_000, 100_000, 2**31 - 1]) | st.integers(0, 2**32 - 1)
            )
            blob, path = png_declaring(w, h), path.with_suffix(".png")
        else:
            blob = byte_damage(data.draw, SEED_IMAGES[name], hot=64)
        path.write_bytes(blob)
        c.outcome = _load(path)


@pytest.mark.parametrize(
    "picture",
    [
        lambda: Image.new("RGB", (1, 2_400_000)),  # scaled whole to 32 px: 32 x 77M, 3 GB
        lambda: Image.new("I;16", (3000, 3000)),  # as float64 all at once: 8 bytes a pixel
        lambda: Image.new("RGB", (5000, 5000)),  # copied by exif_transpose, then convert
    ],
    ids=["thin strip", "16-bit", "large RGB"],
)
def test_campaign_findings_stay_small(tmp_path, picture):
    """What the fuzzing campaign found: legal pictures (within PIL's pixel limit) that took
    gigabytes, or half a minute, to become 32 x 32."""
    path = tmp_path / "picture.png"
    image = picture()
    image.save(path)
    decoded = image.width * image.height * (2 if image.mode == "I;16" else 4)
    held = _reset_peak()
    t0 = time.perf_counter()
    assert load_image(path, 32).shape == (3, 32, 32)
    assert time.perf_counter() - t0 < 10
    if held is not None:  # about one decoded copy, plus what PNG decoding itself holds
        assert _status_bytes("VmHWM") - held < 2 * decoded + 64 * 2**20


@pytest.mark.parametrize("size", [(10_000, 10_000), (100_000, 100_000)], ids=["1.1x", "100x"])
def test_decompression_bomb_is_one_line(domains, tmp_path, capsys, size):
    """Over PIL's limit (89 Mpx) PIL warns and decodes, or (over twice) raises: both are one
    line naming the file, before anything is decoded, in `predict` and in a class folder."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(*size))
    capsys.readouterr()
    assert cli("predict", bomb, "--domain", "toy", "--store", domains["golden"]) == 2
    refused_cleanly(capsys.readouterr().err, str(bomb))

    folder = make_folder(tmp_path / "data", per_class=2)
    shutil.copy(bomb, folder / "red" / "zz.png")
    assert cli(*train_args("b", folder, tmp_path / "store")) == 2
    refused_cleanly(capsys.readouterr().err, str(folder / "red" / "zz.png"))
