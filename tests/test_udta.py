"""The ``udta`` method (a thin side network on frozen taps) and feature caching in training.

The method contract (trains only its own tensors, starts as the pretrained features, state
round-trips) is in test_methods.py. Here: which taps, that nothing of the backbone is on the
gradient path (bytes kept for backward, no graph, no gradients), and that training with
cached features reuses the first epoch's taps and reaches the same results.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import randomise_bn
from da3.backbones import create_backbone
from da3.data import load_domain
from da3.errors import Da3Error
from da3.feature_cache import FeatureCache
from da3.memory import saved_activation_bytes
from da3.methods import FrozenBackbone, build_model, make_config
from da3.methods.udta import stage_ends
from da3.train import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

CLASSES = 3


def random_frozen(name: str) -> FrozenBackbone:
    torch.manual_seed(1234)
    return FrozenBackbone(randomise_bn(create_backbone(name, "none")))


@pytest.fixture(scope="module")
def lite0() -> FrozenBackbone:
    return FrozenBackbone(create_backbone("efficientnet_lite0", "imagenet"))


@pytest.fixture(scope="module")
def digits():
    """A slice of the real digits domain at 32 px: 100 train, 40 validation images."""
    d = load_domain("digits", image_size=32)
    return d.train.images[:100], d.train.labels[:100], d.val.images[:40], d.val.labels[:40]


# ---------------------------------------------------------------------------------------
# the taps


@pytest.mark.parametrize(
    "backbone, expected",
    [("efficientnet_lite0", [2, 4, 10, 15]), ("resnet18", [1, 3, 5, 7])],
)
def test_taps_are_the_last_blocks_of_the_deepest_stages(backbone, expected):
    frozen = random_frozen(backbone)
    assert stage_ends(frozen.lean)[-4:] == expected
    model = build_model("udta", frozen, CLASSES)
    assert model.features.tap_blocks == expected
    three = build_model("udta", frozen, CLASSES, make_config("udta", {"stages": 3}))
    assert three.features.tap_blocks == expected[1:]
    with pytest.raises(Da3Error, match="stages=9"):
        build_model("udta", frozen, CLASSES, make_config("udta", {"stages": 9}))


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "mobilenet_v2", "resnet18"])
def test_taps_equal_the_lean_backbone_outputs(backbone):
    """Bit for bit: the taps are the blocks' outputs (none overwritten in place by a later
    block) and the pooled features are ``forward_features``'s."""
    frozen = random_frozen(backbone)
    model = build_model("udta", frozen, CLASSES).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    taps = model.features.taps(x)
    with torch.no_grad():
        h, outputs = frozen.lean.stem(x), []
        for block in frozen.lean.blocks:
            h = block(h)
            outputs.append(h.clone())
        pooled = frozen.lean.forward_features(x)
    assert len(taps) == len(model.features.tap_blocks) + 1
    for tap, i in zip(taps, model.features.tap_blocks, strict=False):
        assert torch.equal(tap, outputs[i]), i
    assert torch.equal(taps[-1], pooled)
    with torch.no_grad():
        assert torch.equal(model.forward_taps(taps), model(x))


# ---------------------------------------------------------------------------------------
# no gradient through the backbone


def test_nothing_of_the_backbone_is_kept_for_backward():
    frozen = random_frozen("efficientnet_lite0")
    torch.manual_seed(0)
    model = build_model("udta", frozen, CLASSES).train()
    with torch.no_grad():  # a trained side path, so its gradient reaches every stage
        model.features.side_out.weight.normal_(0, 0.1)
    batch, width = 4, model.features.side_out.in_features
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0])

    # The backbone builds no graph: every output of every frozen module is a plain tensor.
    graph_outputs = []
    hooks = [
        m.register_forward_hook(
            lambda m, a, out: (
                graph_outputs.append(type(m).__name__)
                if isinstance(out, torch.Tensor) and (out.requires_grad or out.grad_fn)
                else None
            )
        )
        for m in frozen.lean.modules()
    ]
    try:
        kept = saved_activation_bytes(
            model, lambda: F.cross_entropy(model(x), y), exclude=frozen.stock
        )
    finally:
        for h in hooks:
            h.remove()
    assert not graph_outputs, graph_outputs[:5]
    assert all(p.grad is None for p in frozen.lean.parameters())
    assert all(p.grad is not None for p in model.features.side.parameters())

    # The whole model keeps exactly what the side network keeps given the taps.
    taps = model.features.taps(x)
    kept_side = saved_activation_bytes(
        model, lambda: F.cross_entropy(model.forward_taps(taps), y), exclude=frozen.stock
    )
    assert kept == kept_side

    # ... which is its own inputs (the taps) and a few width-channel maps per stage.
    tap_bytes = sum(t.numel() * t.element_size() for t in taps[:-1])
    maps = sum(batch * width * t.shape[-2] * t.shape[-1] * 4 for t in taps[:-1])
    small = batch * (width + frozen.feature_dim + 2 * CLASSES) * 4  # side_out, head, softmax
    assert tap_bytes <= kept <= tap_bytes + 8 * maps + small, (kept, tap_bytes, maps)

    finetune = build_model("finetune", frozen, CLASSES).train()
    kept_finetune = saved_activation_bytes(
        finetune, lambda: F.cross_entropy(finetune(x), y), exclude=frozen.stock
    )
    assert kept_finetune > 10 * kept, (kept_finetune, kept)


# ---------------------------------------------------------------------------------------
# the feature cache


def test_feature_cache_returns_what_was_computed():
    cache = FeatureCache(6)
    calls = []

    def compute(idx):
        calls.append(idx.tolist())
        return [torch.randn(len(idx), 2, 3, 3), torch.randn(len(idx), 5)]

    first = cache.get(torch.tensor([4, 0, 2]), lambda: compute(torch.tensor([4, 0, 2])))
    second = cache.get(torch.tensor([1, 3, 5]), lambda: compute(torch.tensor([1, 3, 5])))
    assert cache.complete and len(calls) == 2
    assert cache.nbytes == 6 * (18 + 5) * 4
    again = cache.get(torch.tensor([2, 3]), lambda: compute(torch.tensor([2, 3])))
    assert len(calls) == 2, "served from the cache"
    for k in range(2):
        assert torch.equal(again[k][0], first[k][2]) and torch.equal(again[k][1], second[k][1])

    half = FeatureCache(6, "float16")
    taps = half.get(torch.arange(6), lambda: compute(torch.arange(6)))
    assert half.nbytes == cache.nbytes // 2
    back = half.get(torch.arange(6), lambda: compute(torch.arange(6)))
    assert back[0].dtype == torch.float32
    assert torch.allclose(back[0], taps[0], rtol=1e-3, atol=1e-4)
    with pytest.raises(Da3Error, match="bfloat8"):
        FeatureCache(6, "bfloat8")


def _fit(frozen, method, digits, epochs=3, **train):
    torch.manual_seed(0)
    config = make_config(method)
    model = build_model(method, frozen, 10, config)
    stem_calls = []
    hook = frozen.lean.stem.register_forward_hook(lambda m, a, out: stem_calls.append(len(out)))
    try:
        result = fit(
            model,
            *digits,
            frozen.preprocess,
            config,
            TrainConfig(epochs=epochs, batch_size=32, augment=False, **train),
            progress=False,
        )
    finally:
        hook.remove()
    return result, sum(stem_calls)


@pytest.mark.parametrize("method", ["udta", "linear"])
def test_training_with_cached_features_gives_the_same_results(lite0, digits, method):
    n_train, n_val, epochs = len(digits[0]), len(digits[2]), 3
    plain, images_plain = _fit(lite0, method, digits, epochs)
    cached, images_cached = _fit(lite0, method, digits, epochs, cache_features=True)

    # The backbone saw each image once in the cached run, every epoch in the other.
    assert images_plain == epochs * (n_train + n_val)
    assert images_cached == n_train + n_val
    model = build_model(method, lite0, 10)
    x = lite0.stock.preprocess(digits[0][:1])
    per_image = sum(t.numel() * 4 for t in model.features.taps(x))
    assert cached.cache_bytes == (n_train + n_val) * per_image
    assert [h["cache_bytes"] for h in cached.history] == [cached.cache_bytes] * epochs
    assert plain.cache_bytes == 0

    # Epoch 1 computes exactly what the uncached run computes. Later epochs reuse epoch 1's
    # taps; the uncached run recomputes them in other batches, and the backbone's output for
    # an image depends on its batch at float32 rounding (oneDNN picks kernels by batch
    # shape; measured up to ~1e-5 relative), so equality there is to rounding.
    keys = ["train_loss", "train_accuracy", "val_loss", "val_accuracy"]
    assert {k: plain.history[0][k] for k in keys} == {k: cached.history[0][k] for k in keys}
    for a, b in zip(plain.history, cached.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3, abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3, abs=1e-6)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1 / n_val + 1e-9)
    assert plain.best_state.keys() == cached.best_state.keys()
    for k, v in plain.best_state.items():
        assert torch.allclose(v, cached.best_state[k], rtol=1e-3, atol=1e-5), k


def test_float16_cache_halves_the_memory(lite0, digits):
    plain, _ = _fit(lite0, "udta", digits, epochs=2, cache_features=True)
    half, _ = _fit(lite0, "udta", digits, epochs=2, cache_features=True, cache_dtype="float16")
    assert half.cache_bytes * 2 == plain.cache_bytes
    assert half.history[0]["train_loss"] == plain.history[0]["train_loss"]  # computed taps
    assert half.history[1]["train_loss"] == pytest.approx(plain.history[1]["train_loss"], rel=0.05)


def test_cache_refuses_augmentation_and_methods_that_cannot_cache(lite0, digits):
    with pytest.raises(Da3Error, match="cache_features=true needs augment=false"):
        TrainConfig(cache_features=True)
    with pytest.raises(Da3Error, match="cache_dtype='int8'"):
        TrainConfig(augment=False, cache_dtype="int8")
    for method in ("da3", "bias", "finetune"):
        with pytest.raises(Da3Error, match=f"method '{method}' cannot cache features"):
            _fit(lite0, method, digits, epochs=1, cache_features=True)


# ---------------------------------------------------------------------------------------
# the command line


def _folder(root):
    """Three colour classes, 8 noisy 32 px images each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, colour in {
        "red": (220, 30, 30),
        "green": (30, 200, 40),
        "blue": (30, 40, 220),
    }.items():
        (root / name).mkdir(parents=True)
        for i in range(8):
            noise = rng.integers(-40, 40, (32, 32, 3))
            pixels = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_da3_train_caches_features(tmp_path, monkeypatch, capsys):
    from da3.cli import main
    from da3.io import read_json

    monkeypatch.setenv("DA3_CACHE_DIR", str(tmp_path / "cache"))
    data, store = _folder(tmp_path / "data"), tmp_path / "store"
    argv = ["train", "--domain", "c", "--data", str(data), "--method", "udta", "--weights"]
    argv += ["none", "--image-size", "32", "--epochs", "2", "--quiet", "--store", str(store)]

    assert main([*argv, "--cache-features"]) == 2  # augmentation is on by default
    err = capsys.readouterr().err.strip()
    assert err.startswith("da3: error: cache_features=true needs augment=false"), err
    assert main([*argv, "cache_features=true", "method=bias", "augment=false"]) == 2
    assert "method 'bias' cannot cache features" in capsys.readouterr().err
    assert not (store / "runs" / "c").exists(), "a refused run left files behind"

    assert main([*argv, "--cache-features", "augment=false", "cache_dtype=float16"]) == 0
    history = read_json(store / "runs" / "c" / "history.json")["history"]
    assert [h["cache_bytes"] > 0 for h in history] == [True, True]
    assert read_json(store / "c.json")["train"]["cache_features"] is True
