"""One domain as one deployable graph: frozen backbone + the domain's modules + head.

The exported graph takes a normalised float batch ``N x 3 x S x S`` (``(pixel / 255 - mean) /
std``, RGB, S the domain's image size) and returns ``N x classes`` logits. It runs without da3:
an ONNX file needs only onnxruntime, a TorchScript file only torch.

What is folded: the lean backbone already has every batch norm folded into its convolution and
trained biases live in the convolution bias; a backbone still made of stock modules (``finetune``)
is converted to the lean form first; what remains constant (a product of two weights, ...) is
folded by the ONNX optimiser or ``torch.jit.freeze``. Input-dependent branches (DA3's adaptor,
TinyTL's lite residual) are exported as they are.

DA3's gates (``gates="dynamic"``): each gated block becomes a conditional, an ONNX ``If`` node
(from ``torch.cond``) or a TorchScript ``if``, whose true branch runs the frozen branch. At batch
1 a closed gate skips it, as in PyTorch; in a batch it runs when any sample's gate is open and is
multiplied by the per-sample decision (PyTorch runs it on the open samples only: the same
values). ``gates="static"``: the frozen branch always runs, times the decision (same logits, no
control flow, no saving).

Frozen weights stored in 8 bits (``frozen_bits=8``, :mod:`da3.lean.ops`) stay int8 in an ONNX
file: each such convolution becomes a ``DequantizeLinear`` (per output channel, zero point 0:
weight-only, the activations stay float) feeding its ``Conv``, so the file holds the int8
weights and their scales, and onnxruntime computes the same float weights PyTorch does. In
TorchScript (and at 16 bits) the weights are written as the float values they stand for.

Every export checks itself before the file is in place: the written file is run (onnxruntime /
``torch.jit.load``) on the given samples, one at a time and as one batch, and its logits must be
within ``TOLERANCE`` of PyTorch's with the same top-1; otherwise nothing is written.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from da3 import __version__
from da3.backbones import Backbone
from da3.backbones.base import pad_same
from da3.errors import Da3Error
from da3.io import read_json, write_json
from da3.lean import LeanConv2d, frozen_bits_of
from da3.lean.ops import INT8_MAX
from da3.methods import AdaptedModel
from da3.methods.base import ExportContext

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
GATE_MODES = ("dynamic", "static")
TOLERANCE = 1e-4  # absolute, on the logits
RTOL = 1e-5  # ... plus this times the largest |logit|
INPUT_NAME, OUTPUT_NAME = "image", "logits"
EXPORT_FORMAT = "da3-export"
# Inside a TorchScript file, the metadata (the same as the sidecar's) is this extra file.
TS_METADATA = "da3.json"
FOLD_LIMIT = 1 << 28  # elements: fold every constant expression of the weights


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise Da3Error(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    return fmt


def gated_block_count(model: AdaptedModel) -> int:
    """How many dynamic gates ``model`` has (its :meth:`~AdaptedModel.count_gates`)."""
    usage = model.count_gates()
    if usage is None:
        return 0
    usage.stop()
    return len(usage.shares)


# ---------------------------------------------------------------------------------------
# the inference graph


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _lean_backbones(model: nn.Module) -> None:
    """Fold the batch norms of any backbone still made of stock modules (``finetune``)."""
    from da3.lean import to_lean

    for name, m in list(model.named_modules()):
        if isinstance(m, Backbone) and any(isinstance(c, nn.BatchNorm2d) for c in m.modules()):
            try:
                lean = to_lean(m)
            except (TypeError, ValueError):
                continue  # a method's own module inside: export it unfolded
            _set_module(model, name, lean)


class DequantizeConv2d(nn.Module):
    """The ONNX form of a lean convolution whose weight is stored in int8: a per-channel
    dequantization (``quantized_decomposed.dequantize_per_channel``, which the ONNX exporter
    writes as one ``DequantizeLinear`` node on the int8 initializer) and the convolution.
    The same values as :class:`~da3.lean.LeanConv2d` without gradient."""

    def __init__(self, conv: LeanConv2d) -> None:
        super().__init__()
        if conv.weight_scale is None:
            raise ValueError("DequantizeConv2d: the weight is not stored in int8")
        self.register_buffer("weight", conv.weight)
        self.register_buffer("weight_scale", conv.weight_scale)
        self.register_buffer("zero_point", torch.zeros_like(conv.weight_scale, dtype=torch.int64))
        self.bias = conv.bias
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups, self.same_pad = conv.dilation, conv.groups, conv.same_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad:
            x = pad_same(x, tuple(self.weight.shape[-2:]), self.stride)
        w = torch.ops.quantized_decomposed.dequantize_per_channel(
            self.weight, self.weight_scale, self.zero_point, 0, -INT8_MAX, INT8_MAX, torch.int8
        )
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _int8_forms(m: nn.Module) -> int:
    """Give every int8-stored lean convolution under ``m`` its ONNX form; how many."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed

    names = [n for n, c in m.named_modules() if isinstance(c, LeanConv2d) and c.bits == 8]
    for name in names:
        _set_module(m, name, DequantizeConv2d(m.get_submodule(name)))
    return len(names)


def frozen_bits_of_model(model: nn.Module) -> int:
    """The bits the frozen convolutions of a domain's model are stored in (32 when it has
    none of its own, e.g. ``finetune``, whose backbone is trained)."""
    return frozen_bits_of(model) or 32


@torch.no_grad()
def inference_module(model: AdaptedModel, fmt: str, gates: str, example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` ready to export: eval mode, frozen, plain operations (the lean ops
    fall back to them without gradient), gated blocks rebuilt for ``gates`` and ``fmt``.
    ``example`` is one input batch (its size fixes the blocks' shapes)."""
    check_format(fmt)
    if gates not in GATE_MODES:
        raise Da3Error(f"gates must be one of {', '.join(GATE_MODES)}, not {gates!r}")
    # Tensors a forward with gradient left behind (DA3's last gates) cannot be deep-copied.
    memo = {
        id(v): v.detach()
        for sub in model.modules()
        for v in vars(sub).values()
        if isinstance(v, torch.Tensor) and not v.is_leaf
    }
    m = copy.deepcopy(model, memo).eval().requires_grad_(False)
    _lean_backbones(m)
    # A method's module may have an inference form of its own (DA3's gated blocks, which
    # skip their branch): ``export_form(ExportContext) -> nn.Module`` replaces it.
    names = [n for n, sub in m.named_modules() if n and callable(getattr(sub, "export_form", None))]
    if not names:
        if fmt == "onnx":
            _int8_forms(m)
        return m
    inputs: dict[str, torch.Tensor] = {}  # each such module's input, for its shapes
    hooks = [
        m.get_submodule(name).register_forward_pre_hook(
            lambda mod, args, name=name: inputs.__setitem__(name, args[0])
        )
        for name in names
    ]
    try:
        m(example)
    finally:
        for h in hooks:
            h.remove()
    with _quiet():  # tracing (TorchScript forms) warns
        for name in reversed(names):  # the innermost first: an outer form takes them in
            form = m.get_submodule(name).export_form(ExportContext(fmt, gates, inputs[name]))
            _set_module(m, name, form)
    if fmt == "onnx":
        _int8_forms(m)  # the lean convolutions, wherever the forms put them
    return m


# ---------------------------------------------------------------------------------------
# converting


@contextlib.contextmanager
def _quiet():
    """The exporters' progress lines, warnings and failure dumps (whole graphs) would bury
    the one-line result; a failure is reported as a Da3Error instead."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    sink = io.StringIO()
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("ignore")  # incl. torch.jit's deprecation in torch 2.14
            yield
    finally:
        logger.setLevel(level)


def _onnx_bytes(module: nn.Module, example: torch.Tensor, metadata: dict) -> bytes:
    import onnx
    import onnxscript.optimizer

    batch = torch.export.Dim("batch", min=1, max=4096)
    with _quiet(), torch.no_grad():
        # torch.export first: one way of capturing the graph (torch.onnx.export given a module
        # falls back to several, each failing slowly, for a method that cannot be captured).
        program = torch.export.export(
            module, (example,), dynamic_shapes=({0: batch},), strict=False
        )
        program = torch.onnx.export(
            program,
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            optimize=False,
            verbose=False,
        )
        # The exporter's own optimisation, but folding constants of any size: a product of
        # frozen tensors (a masked weight, ...) becomes one weight instead of two.
        onnxscript.optimizer.optimize_ir(
            program.model, input_size_limit=FOLD_LIMIT, output_size_limit=FOLD_LIMIT
        )
    proto = program.model_proto
    for key, value in _flat_metadata(metadata).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"da3 domain {metadata['domain']} ({metadata['method']})"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _flat_metadata(metadata: dict) -> dict[str, str]:
    """ONNX metadata_props are strings: the main keys one by one, and all of it as JSON."""
    inp = metadata["input"]
    return {
        "da3": json.dumps(metadata),
        "domain": metadata["domain"],
        "method": metadata["method"],
        "classes": json.dumps(metadata["classes"]),
        "image_size": str(inp["image_size"]),
        "mean": json.dumps(inp["mean"]),
        "std": json.dumps(inp["std"]),
        "gates": metadata["gates"],
        "backbone_fingerprint": metadata["backbone"].get("fingerprint", ""),
    }


def _torchscript_bytes(module: nn.Module, example: torch.Tensor, metadata: dict) -> bytes:
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False)
        frozen = torch.jit.freeze(traced.eval())
        buf = io.BytesIO()
        torch.jit.save(frozen, buf, _extra_files={TS_METADATA: json.dumps(metadata)})
    return buf.getvalue()


# onnxruntime keeps weight-only DequantizeLinear nodes (for quantized execution providers) and
# runs them at every inference, about 2.5x the latency of float weights at batch 1 on a CPU;
# with this entry its constant folding turns them into float weights once, when the session
# opens: the same values, a small file on disk, float speed.
ORT_FOLD_DEQUANTIZE = ("session.disable_quant_qdq", "1")


def open_runner(
    path: str | Path, fmt: str, threads: int = 0, fold_dequantize: bool = True
) -> Callable:
    """A function ``float tensor N x 3 x S x S -> logits tensor`` running the exported file
    with its own runtime (onnxruntime, or ``torch.jit.load``); ``threads``: 0 = default;
    ``fold_dequantize``: onnxruntime folds int8 weights' DequantizeLinear nodes when the
    session opens (:data:`ORT_FOLD_DEQUANTIZE`) instead of running them each time."""
    check_format(fmt)
    if fmt == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if fold_dequantize:
            opts.add_session_config_entry(*ORT_FOLD_DEQUANTIZE)
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        def run_onnx(x: torch.Tensor) -> torch.Tensor:
            out = sess.run([OUTPUT_NAME], {INPUT_NAME: x.detach().cpu().numpy()})[0]
            return torch.from_numpy(out)

        return run_onnx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")

    @torch.no_grad()
    def run_ts(x: torch.Tensor) -> torch.Tensor:
        return module(x)

    return run_ts


# ---------------------------------------------------------------------------------------
# checking and writing


@dataclass
class Comparison:
    max_abs_diff: float
    top1_agree: int
    samples: int
    tolerance: float = TOLERANCE
    rtol: float = RTOL
    logit_scale: float = 0.0  # the largest |logit| PyTorch gave on the samples

    @property
    def allowed(self) -> float:
        """The largest difference accepted: ``tolerance + rtol * logit_scale``."""
        return self.tolerance + self.rtol * self.logit_scale

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.allowed and self.top1_agree == self.samples


def _agree(ref: torch.Tensor, got: torch.Tensor, allowed: float) -> int:
    """Samples with the same top-1 (a tie within ``allowed`` in PyTorch's logits counts)."""
    top = ref.argmax(1)
    same = got.argmax(1) == top
    picked = ref.gather(1, got.argmax(1, keepdim=True)).squeeze(1)
    tie = (ref.max(1).values - picked) <= allowed
    return int((same | tie).sum())


@torch.no_grad()
def compare(
    model: nn.Module,
    run: Callable,
    samples: torch.Tensor,
    tolerance: float = TOLERANCE,
    rtol: float = RTOL,
) -> Comparison:
    """PyTorch ``model`` against the exported ``run``: each sample alone (where gates skip
    branches) and all of them as one batch. Accepted: logits within ``tolerance + rtol *
    (largest |logit|)`` and the same top-1 everywhere."""
    model.eval()
    pairs = [(model(samples[i : i + 1]), run(samples[i : i + 1])) for i in range(len(samples))]
    pairs.append((model(samples), run(samples)))
    if any(got.shape != ref.shape for ref, got in pairs):
        return Comparison(float("inf"), 0, len(samples), tolerance, rtol)
    scale = max(float(ref.abs().max()) for ref, _ in pairs)
    cmp = Comparison(0.0, 0, len(samples), tolerance, rtol, scale)
    cmp.max_abs_diff = max(float((ref - got).abs().max()) for ref, got in pairs)
    alone = sum(_agree(ref, got, cmp.allowed) for ref, got in pairs[:-1])
    cmp.top1_agree = min(alone, _agree(*pairs[-1], cmp.allowed))
    return cmp


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    format: str
    gates: str
    comparison: Comparison
    seconds: float
    bytes: int


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


MAX_SIDECAR_BYTES = 16 * 2**20


def read_sidecar(path: str | Path) -> dict:
    """The metadata of an exported model, from its JSON sidecar (``path`` is the sidecar or
    the model file), checked: every key a deployment needs to feed the graph and read its
    output is there, with the right type, and agrees with the others. Raises a Da3Error
    naming the file otherwise."""
    from da3.data.imaging import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

    path = Path(path)
    path = path if path.suffix == ".json" else sidecar_path(path)
    meta = read_json(path, MAX_SIDECAR_BYTES)

    def require(ok: bool, why: str) -> None:
        if not ok:
            raise Da3Error(f"{path}: {why}")

    def number(x) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

    require(meta.get("format") == EXPORT_FORMAT, "not a da3 export sidecar")
    version = meta.get("format_version")
    require(type(version) is int, "format_version is not an integer")
    require(version <= 1, f"written by a newer da3 (format {version})")
    for key in ("domain", "method"):
        require(isinstance(meta.get(key), str), f"{key!r} is not a JSON string")
    classes = meta.get("classes")
    require(
        isinstance(classes, list)
        and len(classes) >= 2
        and all(isinstance(c, str) for c in classes),
        "'classes' is not a list of at least 2 names",
    )
    inp, out = meta.get("input"), meta.get("output")
    require(isinstance(inp, dict), "'input' is not a JSON object")
    size = inp.get("image_size")
    require(
        type(size) is int and MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE,
        f"input image_size is not an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}",
    )
    require(isinstance(inp.get("name"), str), "input name is not a JSON string")
    require(inp.get("shape") == ["batch", 3, size, size], "input shape disagrees with image_size")
    for key in ("mean", "std"):
        v = inp.get(key)
        require(
            isinstance(v, list) and len(v) == 3 and all(map(number, v)),
            f"input {key} is not 3 numbers",
        )
    require(all(s > 0 for s in inp["std"]), "input std is not positive")
    require(isinstance(out, dict), "'output' is not a JSON object")
    require(isinstance(out.get("name"), str), "output name is not a JSON string")
    require(out.get("shape") == ["batch", len(classes)], "output shape disagrees with the classes")
    backbone = meta.get("backbone")
    require(
        isinstance(backbone, dict) and isinstance(backbone.get("fingerprint"), str),
        "'backbone' has no fingerprint",
    )
    require(
        meta.get("gates", "none") in (*GATE_MODES, "none"), "'gates' is not dynamic, static or none"
    )
    return meta


def export_model(
    model: AdaptedModel,
    path: str | Path,
    fmt: str,
    samples: torch.Tensor,
    metadata: dict,
    gates: str = "dynamic",
    tolerance: float = TOLERANCE,
    rtol: float = RTOL,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export ``model`` (a domain's network) to ``path`` as ``fmt``, verified on ``samples``
    (normalised N x 3 x S x S, N >= 2), with ``metadata`` (see :func:`domain_metadata`) in the
    file and in the JSON sidecar ``path + '.json'``. Raises :class:`Da3Error` naming the file
    when the method cannot be exported or the exported file does not match PyTorch; then no
    file is written and an existing one at ``path`` is left as it was. The largest absolute
    difference of the logits accepted is ``tolerance + rtol * (largest |logit|)``: float32
    rounding differs between runtimes, and grows with the logits (about 5e-5 on logits of 30).
    ``progress``: told each step as it starts (the conversion takes tens of seconds)."""
    say = progress or (lambda msg: None)
    check_format(fmt)
    if not 0 < tolerance < float("inf"):
        raise Da3Error(f"export: tolerance must be positive, got {tolerance}")
    if not 0 <= rtol < float("inf"):
        raise Da3Error(f"export: rtol must be zero or positive, got {rtol}")
    path = Path(path)
    if len(samples) < 2:
        raise Da3Error("export: verification needs at least 2 sample images")
    t0 = time.perf_counter()
    model.eval()
    gated = gated_block_count(model)
    has_gates = bool(gated)
    mode = gates if has_gates else "none"
    metadata = dict(metadata, gates=mode, export_format=fmt)
    metadata["gated_blocks"] = gated
    # the precision of the frozen weights exported (and checked against PyTorch at it)
    metadata["frozen_bits"] = frozen_bits_of_model(model)
    example = samples[:2]
    try:
        say("building the inference graph" + (f" ({mode} gates)" if has_gates else ""))
        module = inference_module(model, fmt, gates if has_gates else "static", example)
        say(f"converting to {'ONNX' if fmt == 'onnx' else 'TorchScript'} (the slow part)")
        blob = (_onnx_bytes if fmt == "onnx" else _torchscript_bytes)(module, example, metadata)
    except Da3Error:
        raise
    except Exception as err:  # noqa: BLE001 - any exporter failure: the method does not export
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        raise Da3Error(
            f"{path}: method {model.method!r} cannot be exported to {fmt} "
            f"({type(err).__name__}: {detail})"
        ) from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise Da3Error(f"{path.parent}: cannot write here ({err.strerror})") from None
    tmp = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))
        say(
            f"checking it against PyTorch on {len(samples)} images with "
            f"{'onnxruntime' if fmt == 'onnx' else 'torch.jit'}"
        )
        try:
            cmp = compare(model, open_runner(tmp, fmt), samples, tolerance, rtol)
        except Exception as err:  # noqa: BLE001 - a file its runtime cannot run does not match
            raise Da3Error(
                f"{path}: the exported file does not run in "
                f"{'onnxruntime' if fmt == 'onnx' else 'torch.jit'} ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:300]}); nothing written"
            ) from None
        if not cmp.ok:
            raise Da3Error(
                f"{path}: exported {fmt} does not match PyTorch (max abs diff on logits "
                f"{cmp.max_abs_diff:.3g}, accepted {cmp.allowed:.3g} = {tolerance:g} + "
                f"{rtol:g} x largest logit {cmp.logit_scale:.3g}; same top-1 on "
                f"{cmp.top1_agree} of {cmp.samples} samples); nothing written"
            )
        metadata["verification"] = {
            "samples": cmp.samples,
            "max_abs_diff": cmp.max_abs_diff,
            "tolerance": tolerance,
            "rtol": rtol,
            "logit_scale": cmp.logit_scale,
            "top1_agree": cmp.top1_agree,
            "runtime": runtime_version(fmt),
        }
        sidecar = sidecar_path(path)
        sidecar_mode = _file_mode(sidecar)
        write_json(sidecar, metadata)
        os.chmod(sidecar, sidecar_mode)  # it goes wherever the model goes
        os.replace(tmp, path)
    except OSError as err:
        raise Da3Error(f"{path}: cannot write ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(
        path, sidecar, fmt, mode, cmp, time.perf_counter() - t0, path.stat().st_size
    )


def _file_mode(path: Path) -> int:
    """The mode of the file being replaced, else what a plain ``open`` would give (a temporary
    file is private to its owner; a deployed model need not be)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def runtime_version(fmt: str) -> str:
    if fmt == "onnx":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    return f"torch.jit (torch {torch.__version__})"


def domain_metadata(
    domain: str,
    method: str,
    classes: list[str],
    image_size: int,
    preprocess: dict,
    backbone: dict,
    source: dict | None = None,
) -> dict:
    """What a deployment needs to feed the graph and read its output (the sidecar's body)."""
    return {
        "format": EXPORT_FORMAT,
        "format_version": 1,
        "domain": domain,
        "method": method,
        "classes": list(classes),
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, image_size, image_size],
            "dtype": "float32",
            "layout": "NCHW, RGB",
            "image_size": image_size,
            "mean": list(preprocess["mean"]),
            "std": list(preprocess["std"]),
            "normalise": "(pixel / 255 - mean) / std, per channel",
            "resize": "short side to image_size (PIL bilinear), centre crop to a square",
        },
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(classes)], "meaning": "logits"},
        "backbone": dict(backbone),
        "source": source or {},
        "library_version": __version__,
        "torch": torch.__version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
