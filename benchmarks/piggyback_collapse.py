"""Why Piggyback's training can collapse: the loss and the share of mask bits turned off, step
by step, on digits at 128 px (the `da3 bench --full` setting where two of three seeds fell to
chance with masks alone), for a few learning rates of the mask scores, with and without the
learned per-channel shift (``shift_lr``; 0: masks alone, as before it existed).

    python benchmarks/piggyback_collapse.py --lrs 2e-4 1e-4 --shift-lrs 0 1e-3 --steps 150

Every score starts at the same value above the threshold and AdamW moves a score by about the
learning rate a step whatever its gradient's size, so every score whose gradient keeps one sign
crosses the threshold at the same step, (score_init - threshold) / lr: a synchronized flip of
many bits at once. Constant learning rate here (the cosine barely moves in the first 150 of 630
steps); validation loss on 256 validation images after every step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from da3.backbones import create_backbone
from da3.bench.common import header, run_info, save
from da3.data import load_domain
from da3.io import read_json
from da3.methods import FrozenBackbone, build_model, make_config
from da3.train import augment_batch, make_optimizer

RESULTS = Path(__file__).resolve().parent / "results"


def trace(
    frozen, data, lr: float, shift_lr: float, steps: int, seed: int, device: str
) -> list[dict]:
    torch.manual_seed(seed)
    config = make_config("piggyback", {"lr": lr, "shift_lr": shift_lr})
    model = build_model("piggyback", frozen, len(data.classes), config).to(device)
    optimizer = make_optimizer(model, config)
    pre = frozen.preprocess
    masked = [m for m in model.modules() if hasattr(m, "scores")]
    total = sum(m.scores.numel() for m in masked)
    xv, yv = pre(data.val.images[:256]).to(device), data.val.labels[:256].to(device)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.train.images), generator=g)
    rows = []
    for step in range(1, steps + 1):
        i = ((step - 1) * 32) % (len(order) - 32)
        idx = order[i : i + 32]
        model.train()
        x = pre(augment_batch(data.train.images[idx], g)).to(device)
        loss = F.cross_entropy(model(x), data.train.labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            val = F.cross_entropy(model(xv), yv).item()
        off = sum(int((~m.mask()).sum()) for m in masked) / total
        rows.append({"step": step, "train_loss": loss.item(), "val_loss": val, "bits_off": off})
        print(
            f"lr {lr:g} shift_lr {shift_lr:g} step {step}: loss {loss.item():.3f} "
            f"val {val:.3f} off {off:.4f}",
            flush=True,
        )
    return rows


def markdown(info: dict, args: dict, runs: dict[str, list[dict]]) -> str:
    config = make_config("piggyback", {})
    lines = [
        f"Piggyback on digits, efficientnet_lite0 (imagenet), {args['image_size']} px, batch 32, "
        f"seed {args['seed']}, constant learning rate; scores start at {config.score_init:g}, "
        f"threshold {config.threshold:g}; validation loss on 256 validation images. shift_lr: "
        "the learning rate of the per-channel shift (0: masks alone).",
        "",
        "| lr | shift_lr | first step with bits off | share of bits off then | val loss before | "
        "highest val loss after | val loss at the end | share off at the end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, rows in runs.items():
        # keys "LR" (runs from before shift_lr existed: masks alone) or "LR/SHIFT_LR"
        lr, _, shift_lr = key.partition("/")
        lr = f"{lr} | {shift_lr or 0}"
        first = next((r for r in rows if r["bits_off"] > 0), None)
        if first is None:
            lines.append(
                f"| {lr} | none in {args['steps']} steps | | | | {rows[-1]['val_loss']:.3f} | 0 |"
            )
            continue
        k = first["step"]
        before = rows[k - 2]["val_loss"] if k > 1 else float("nan")
        worst = max(r["val_loss"] for r in rows[k - 1 :])
        lines.append(
            f"| {lr} | {k} | {first['bits_off']:.1e} | {before:.3f} | {worst:.3f} | "
            f"{rows[-1]['val_loss']:.3f} | {rows[-1]['bits_off']:.1e} |"
        )
    lines.append("")
    lines.append("Chance level: val loss ln(10) = 2.303.")
    md = header(info, "Piggyback: a synchronized flip of mask bits") + "\n".join(lines) + "\n"
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", nargs="+", type=float, default=[2e-4, 1e-4])
    ap.add_argument("--shift-lrs", nargs="+", type=float, default=[0.0, 1e-3])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rewrite", action="store_true", help="only rewrite the .md from the .json")
    args = ap.parse_args()
    if args.rewrite:
        old = read_json(RESULTS / "piggyback_collapse.json")
        save(RESULTS, "piggyback_collapse", old, markdown(old["info"], old["args"], old["runs"]))
        return
    torch.set_num_threads(args.threads)
    info = run_info(args.device)
    t0 = time.perf_counter()
    frozen = FrozenBackbone(create_backbone("efficientnet_lite0", "imagenet").to(args.device))
    data = load_domain("digits", image_size=args.image_size)
    runs = {
        f"{lr:g}/{shift_lr:g}": trace(
            frozen, data, lr, shift_lr, args.steps, args.seed, args.device
        )
        for lr in args.lrs
        for shift_lr in args.shift_lrs
    }
    info["stage_seconds"] = {"trace": round(time.perf_counter() - t0, 1)}
    md = markdown(info, vars(args), runs)
    save(RESULTS, "piggyback_collapse", {"info": info, "args": vars(args), "runs": runs}, md)


if __name__ == "__main__":
    main()
