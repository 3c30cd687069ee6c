"""The profiler: keys, deterministic quantities, the fresh-process peak, the command."""

import json

import pytest

from da3.cli import main
from da3.profile import format_table, profile_methods

KEYS = {
    "backbone",
    "method",
    "image_size",
    "batch_size",
    "device",
    "saved_activation_bytes",
    "peak_memory_bytes",
    "baseline_memory_bytes",
    "step_seconds",
    "trainable_parameters",
    "inference_flops",
    "analytical_floor_bytes",
    "machine",
}


@pytest.fixture(scope="module")
def rows():
    return profile_methods(
        "resnet18", ["finetune", "linear", "bias", "da3"], image_size=64, batch_size=2, steps=2
    )


def test_every_row_has_the_documented_keys(rows):
    assert [r["method"] for r in rows] == ["finetune", "linear", "bias", "da3"]
    for r in rows:
        assert set(r) >= KEYS, KEYS - set(r)
        assert r["step_seconds"] > 0 and len(r["step_seconds_all"]) == 2


def test_deterministic_quantities_are_ordered_as_the_methods_require(rows):
    by = {r["method"]: r for r in rows}
    # linear keeps only the head's input; bias the masks of the whole network; finetune all
    head_input = 2 * 512 * 4  # batch 2 x 512 features, float32
    loss_own = 2 * 10 * 4 + 2 * 8 + 4  # cross-entropy keeps log-softmax, targets, a scalar
    assert by["linear"]["saved_activation_bytes"] == head_input + loss_own
    assert by["linear"]["saved_activation_bytes"] < by["bias"]["saved_activation_bytes"]
    assert by["bias"]["saved_activation_bytes"] * 20 < by["finetune"]["saved_activation_bytes"]
    # lean methods sit at their analytical floor
    for m in ("linear", "bias", "da3"):
        r = by[m]
        assert r["analytical_floor_bytes"] <= r["saved_activation_bytes"]
        assert r["saved_activation_bytes"] <= 1.5 * r["analytical_floor_bytes"]
    # same backbone: the head-only and bias methods run the same inference FLOPs
    assert by["linear"]["inference_flops"] == by["bias"]["inference_flops"]
    assert by["da3"]["inference_flops"] > by["linear"]["inference_flops"]
    assert by["finetune"]["trainable_parameters"] > 100 * by["bias"]["trainable_parameters"]


def test_peak_memory_is_measured_in_a_fresh_process(rows):
    by = {r["method"]: r for r in rows}
    for r in rows:
        assert r["peak_memory_bytes"] > 0
        assert r["baseline_memory_bytes"] > 50 * 2**20  # a process with torch and a model
    # finetune's step allocates gradients and AdamW state for 11 M parameters (> 130 MB)
    assert by["finetune"]["peak_memory_bytes"] > 100 * 2**20
    assert by["finetune"]["peak_memory_bytes"] > 3 * by["linear"]["peak_memory_bytes"]


def test_table_shows_ratios_against_finetune(rows):
    text = format_table(rows)
    assert "saved ÷" in text and "resnet18" in text
    assert len(text.splitlines()) == 2 + len(rows)


def test_json_command_output(capsys):
    code = main(
        [
            "profile",
            "--backbone",
            "resnet18",
            "--method",
            "linear,bias",
            "--image-size",
            "32",
            "--batch-size",
            "2",
            "--steps",
            "1",
            "--no-peak",
            "--json",
        ]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["linear", "bias"]
    assert all(r["image_size"] == 32 and r["batch_size"] == 2 for r in rows)


def test_bad_arguments_are_one_line_errors(capsys):
    assert main(["profile", "--method", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("da3: error: unknown method 'nope'") and "\n" not in err
    assert main(["profile", "--backbone", "vgg", "--method", "linear"]) == 2
    assert "unknown backbone" in capsys.readouterr().err
