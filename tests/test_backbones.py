"""The backbone registry contract, the block view, and the real ImageNet check."""

import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from da3.backbones import create_backbone, list_backbones, lite0_weights_file, weights_fingerprint
from da3.backbones.base import same_padding
from da3.backbones.efficientnet_lite import EfficientNetLite0
from da3.errors import Da3Error

ALL = list_backbones()
EXPECTED_BLOCKS = {"resnet18": 8, "resnet50": 16, "mobilenet_v2": 17, "efficientnet_lite0": 16}


def test_registry_lists_the_four_backbones():
    assert set(ALL) == set(EXPECTED_BLOCKS)


@pytest.mark.parametrize("name", ALL)
def test_forward_shapes_and_block_view(name):
    b = create_backbone(name)
    assert len(b.blocks) == EXPECTED_BLOCKS[name]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = b.stem(x)
        for block in b.blocks:
            assert h.shape[1] == block.in_channels
            y = block(h)
            assert y.shape[1] == block.out_channels
            assert y.shape[-1] == -(-h.shape[-1] // block.stride)
            if block.shortcut_kind == "identity":
                assert block.in_channels == block.out_channels and block.stride == 1
            # branch and shortcut run separately recompose the block exactly
            parts = block.branch(h)
            s = block.forward_shortcut(h)
            if s is not None:
                parts = parts + s
            assert torch.equal(block.act(parts), y)
            h = y
        assert b.forward_features(x).shape == (2, b.feature_dim)


def _native(name):
    """The architecture's own implementation, holding the very modules of the view."""
    from torchvision import models

    if name == "efficientnet_lite0":
        return EfficientNetLite0()
    return getattr(models, name)(weights=None)


@pytest.mark.parametrize("name", ALL)
def test_block_view_reproduces_the_native_model_exactly(name, monkeypatch):
    native = _native(name).eval()
    # Build the view around this very instance so that both share their weights.
    from da3.backbones import efficientnet_lite, torchvision_models
    from da3.backbones.base import IMAGENET_PREPROCESS

    if name == "efficientnet_lite0":
        view = efficientnet_lite.lite0_to_backbone(
            native, preprocess=IMAGENET_PREPROCESS, weights="x"
        )
    elif name == "mobilenet_v2":
        view = torchvision_models.mobilenet_v2_to_backbone(
            native, preprocess=IMAGENET_PREPROCESS, weights="x"
        )
    else:
        view = torchvision_models.resnet_to_backbone(
            native, name=name, preprocess=IMAGENET_PREPROCESS, weights="x"
        )
    view.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(view(x), native(x))


def test_same_padding_matches_tensorflow_rule():
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(224, 5, 2) == (1, 2)
    assert same_padding(225, 3, 2) == (1, 1)
    assert same_padding(7, 3, 1) == (1, 1)


def test_weights_file_round_trip_and_errors(tmp_path):
    b = create_backbone("resnet18")
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    torch.manual_seed(1)  # other weights than the registry's seeded random init
    native = resnet18(weights=None)
    path = tmp_path / "r18.safetensors"
    save_file(native.state_dict(), str(path))
    loaded = create_backbone("resnet18", str(path))
    assert torch.equal(loaded.stem[0].weight, native.conv1.weight)
    assert weights_fingerprint(loaded) != weights_fingerprint(b)
    with pytest.raises(Da3Error, match="not found"):
        create_backbone("resnet18", str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(Da3Error, match="bad.pth: cannot read"):
        create_backbone("resnet18", str(bad))
    with pytest.raises(Da3Error, match="do not match"):
        create_backbone("resnet50", str(path))
    with pytest.raises(Da3Error, match="unknown backbone"):
        create_backbone("vgg16")


def test_fingerprint_is_stable_and_sensitive():
    a = create_backbone("efficientnet_lite0", "imagenet")
    b = create_backbone("efficientnet_lite0", "imagenet")
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.blocks[3].branch[0].weight[0, 0, 0, 0] += 1e-3
    assert weights_fingerprint(a) != weights_fingerprint(b)


def _foolbox_images():
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        pytest.skip("foolbox not installed (pip install --no-deps foolbox==3.3.4)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = sorted(folder.glob("imagenet_*.jpg"))
    assert len(files) == 20
    images, labels = [], []
    for f in files:
        im = Image.open(f).convert("RGB").resize((224, 224), Image.BILINEAR)
        images.append(torch.from_numpy(np.array(im)).permute(2, 0, 1))
        labels.append(int(re.search(r"_(\d+)\.jpg$", f.name).group(1)))
    return torch.stack(images), torch.tensor(labels)


def test_efficientnet_lite0_imagenet_weights_classify_real_photos():
    assert lite0_weights_file().is_file()
    b = create_backbone("efficientnet_lite0", "imagenet")
    images, labels = _foolbox_images()
    with torch.no_grad():
        logits = b(b.preprocess(images))
    top5 = logits.topk(5, dim=1).indices
    top1_correct = int((top5[:, 0] == labels).sum())
    top5_correct = int((top5 == labels[:, None]).any(1).sum())
    assert top1_correct >= 16, top1_correct
    assert top5_correct == 20, top5_correct


def test_efficientnet_lite0_8_bit_frozen_weights_classify_real_photos():
    """The quantized lean backbone where the truth is known (#17): int8 weights (a scale per
    output channel, batch norm folded) lose at most one of float32's 17/20 top-1 photos, keep
    20/20 top-5, and agree with float32's logits (measured: min cosine 0.984, relative
    difference 0.10, top-1 the same on 18 of 20; float16: 4e-3 and 20 of 20)."""
    from da3.lean import to_lean

    b = create_backbone("efficientnet_lite0", "imagenet")
    images, labels = _foolbox_images()
    x = b.preprocess(images)
    with torch.no_grad():
        ref = to_lean(b)(x)
        logits = {bits: to_lean(b, frozen_bits=bits)(x) for bits in (16, 8)}
    top5 = logits[8].topk(5, dim=1).indices
    assert int((top5[:, 0] == labels).sum()) >= 16
    assert int((top5 == labels[:, None]).any(1).sum()) == 20
    cos = torch.nn.functional.cosine_similarity(logits[8], ref)
    assert float(cos.min()) > 0.97
    assert float((logits[8] - ref).norm() / ref.norm()) < 0.15
    assert int((logits[8].argmax(1) == ref.argmax(1)).sum()) >= 17
    assert float((logits[16] - ref).norm() / ref.norm()) < 0.01
    assert torch.equal(logits[16].argmax(1), ref.argmax(1))


def test_random_weights_do_not_pass_the_imagenet_check():
    # guards the check above against passing for a wrong reason
    b = create_backbone("efficientnet_lite0")
    images, labels = _foolbox_images()
    with torch.no_grad():
        top1 = b(b.preprocess(images)).argmax(1)
    assert int((top1 == labels).sum()) <= 3


def test_lite0_loads_strictly():
    state = torch.load(lite0_weights_file(), weights_only=True)
    assert len(state) == 296
    net = EfficientNetLite0()
    net.load_state_dict(state, strict=True)
    assert isinstance(net._blocks[0]._depthwise_conv, nn.Conv2d)


def test_random_weights_are_reproducible_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = weights_fingerprint(create_backbone("resnet18"))
    b = weights_fingerprint(create_backbone("resnet18", "none"))
    assert a == b
    assert torch.equal(state, torch.random.get_rng_state())


def _lean_state(backbone, bits):
    from da3.lean import to_lean

    return to_lean(backbone, consume=True, frozen_bits=bits).state_dict()


@pytest.mark.parametrize(
    "name,weights,fmt",
    [
        ("efficientnet_lite0", "imagenet", None),
        ("resnet18", None, None),
        ("mobilenet_v2", None, None),
        ("resnet18", "file", "safetensors"),
        ("resnet18", "file", "pth"),
        ("resnet18", "file", "legacy"),
    ],
)
def test_a_lazy_backbone_is_the_same_backbone(name, weights, fmt, tmp_path):
    """Read a part at a time or all at once: the same fingerprint, the same lean weights
    bit for bit, from every source of weights."""
    from da3.backbones.lazy import is_lazy, reader_of

    if weights == "file":
        from torchvision.models import resnet18

        torch.manual_seed(3)
        state = resnet18(weights=None).state_dict()
        weights = str(tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pth'}")
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(state, weights)
        else:
            torch.save(state, weights, _use_new_zipfile_serialization=fmt == "pth")
    eager = create_backbone(name, weights)
    lazy = create_backbone(name, weights, lazy=True)
    assert is_lazy(lazy) and not is_lazy(eager)
    assert reader_of(eager) is None  # nothing kept for reading (a legacy file's tensors)
    assert weights_fingerprint(lazy) == weights_fingerprint(eager)
    assert is_lazy(lazy)  # the fingerprint read the weights and kept none
    for bits in (32, 8):
        a = _lean_state(create_backbone(name, weights), bits)
        b = _lean_state(create_backbone(name, weights, lazy=True), bits)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("source", ["random", "legacy", "zip"])
def test_a_lazy_backbone_holds_one_layer_of_float32_weights_at_a_time(source, tmp_path):
    """Converted to the lean form at 8 bits, a lazy ResNet-18 (44.6 MiB of float32
    weights) never holds more float32 stock weights than its largest layer (one 3x3
    convolution of 512 channels and its batch norm: 9.0 MiB), whether its weights are made
    or read from a .pth file, a legacy one (torch.save before zip files) included."""
    from da3.backbones.lazy import named_tensors
    from da3.lean import to_lean

    weights = None
    if source != "random":
        from torchvision.models import resnet18

        weights = str(tmp_path / "r18.pth")
        torch.save(resnet18().state_dict(), weights, _use_new_zipfile_serialization=source == "zip")
    backbone = create_backbone("resnet18", weights, lazy=True)
    reader = backbone.weight_reader
    held = []
    read = reader._read

    def counting(names):
        held.append(sum(t.nbytes for _, t in named_tensors(backbone) if not t.is_meta))
        got = read(names)
        held[-1] += sum(t.nbytes for t in got.values())
        return got

    reader._read = counting
    weights_fingerprint(backbone)
    to_lean(backbone, consume=True, frozen_bits=8)
    total = sum(t.nbytes for _, t in named_tensors(create_backbone("resnet18")))
    assert total > 44 * 2**20
    largest = 512 * 512 * 9 * 4 + 4 * 512 * 4 + 8
    assert max(held) <= largest, (max(held), largest)


def test_a_legacy_weights_file_is_read_a_tensor_at_a_time_and_runs_no_code(tmp_path):
    """EfficientNet-Lite0's ImageNet weights come as a legacy .pth (torch.save before zip
    files): read lazily, tensor by tensor, the same values and strides as torch.load gives.
    A legacy file whose pickle calls anything but a state dict's parts is refused with a
    one-line error, and what it would call does not run."""
    import pickle

    from da3.backbones import lite0_weights_file
    from da3.backbones.lazy import file_reader

    path = lite0_weights_file()
    whole = torch.load(path, map_location="cpu", weights_only=True)
    reader = file_reader(path, {k: (tuple(v.shape), v.dtype) for k, v in whole.items()})
    names = list(whole)
    got = reader(names[:40]) | reader(names[40:])
    for k in names:
        assert torch.equal(got[k], whole[k]) and got[k].stride() == whole[k].stride(), k
    stem = whole["_conv_stem.weight"]
    assert stem.stride() != stem.contiguous().stride()  # strides as saved, not contiguous

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        for part in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(part, f)
        pickle.dump({"_conv_stem.weight": Evil()}, f)
        pickle.dump([], f)
    with pytest.raises(Da3Error, match=r"evil.pth: ") as err:
        create_backbone("efficientnet_lite0", str(bad), lazy=True)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_a_legacy_tensor_larger_than_its_storage_is_not_read_past_it(tmp_path):
    """A legacy .pth whose tensor claims more elements than its storage holds is not read
    into the bytes after it: the file is refused with a one-line error."""
    import collections
    import pickle
    import struct

    from da3.backbones.lazy import _legacy_index, file_reader

    storage = object()

    class Tensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (storage, 0, (100,), (1,), False, {}))

    class Saver(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "k0", "cpu", 4) if obj is storage else None

    path = tmp_path / "short.pth"
    with open(path, "wb") as f:
        for part in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(part, f)
        Saver(f).dump(collections.OrderedDict(w=Tensor()))
        pickle.dump(["k0"], f)
        f.write(struct.pack("<q", 4) + bytes(16) + bytes(400))  # 4 floats, then other bytes
    assert _legacy_index(path) is None
    with pytest.raises(Da3Error, match=r"short.pth: ") as err:
        file_reader(path, {"w": ((100,), torch.float32)})
    assert "\n" not in str(err.value)


def test_a_weights_file_cut_while_a_lazy_backbone_reads_it_is_a_one_line_error(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    path = tmp_path / "r18.safetensors"
    save_file(resnet18(weights=None).state_dict(), str(path))
    lazy = create_backbone("resnet18", str(path), lazy=True)
    path.write_bytes(path.read_bytes()[:1000])  # cut after the checks, before the reads
    with pytest.raises(Da3Error, match=r"r18.safetensors: cannot read weights") as err:
        weights_fingerprint(lazy)
    assert "\n" not in str(err.value)
