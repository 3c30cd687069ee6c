"""Where a fleet's domain falls behind under label skew: the head or the adaptors (issue #19).

    python benchmarks/federated_head.py --domain digits [--out federated_head_digits]

Trains a fleet as ``benchmarks/federated.py`` does (quick protocol, 8 clients, by-class:3,
10 rounds of 3 local epochs, FedAvgM momentum 0.5, seed 0), then keeps its adaptors and
re-fits only its head (a linear layer on the features), from the fleet's head, with Adam at
DA3's head learning rate, batches of 32:

* on the features of all the training images (what no device may send: the bound);
* on virtual features drawn from a Gaussian per class fitted to those features: full
  covariance, covariance of rank 16 plus a diagonal (what ``--calibrate-head 16`` asks each
  device for, here pooled over the devices), and diagonal only; 500 per class;

each for 10 and 30 epochs, and scores each head on the test split. Writes
benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from da3.bench.common import header, run_info, save
from da3.federated import FederateSettings, federate
from da3.federated.calibrate import Mixture, feature_stats
from da3.federated.client import build_domain
from da3.train import evaluate

RESULTS = Path(__file__).resolve().parent / "results"


def head_inputs(net, preprocess, split, batch: int = 64):
    rows = []
    net.eval()
    with torch.no_grad():
        for i in range(0, len(split.labels), batch):
            rows.append(net.features(preprocess(split.images[i : i + batch])))
    return torch.cat(rows), split.labels


def refit(head, x, y, xt, yt, lr: float, epochs: int, seed: int) -> float:
    h = copy.deepcopy(head)
    h.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(h.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 32):
            idx = order[i : i + 32]
            opt.zero_grad()
            F.cross_entropy(h(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        return float((h(xt).argmax(1) == yt).float().mean())


def virtual(x, y, kind: str, per_class: int, seed: int):
    """``per_class`` draws per class from a Gaussian fitted to that class's rows of ``x``:
    ``full`` covariance, or ``rank K`` plus a diagonal (``diagonal``: rank 0), the latter as
    ``--calibrate-head K`` fits and draws them (:mod:`da3.federated.calibrate`), here from the
    pooled features."""
    g = torch.Generator().manual_seed(seed)
    labels = y.unique().repeat_interleave(per_class)
    if kind != "full":
        rank = 0 if kind == "diagonal" else int(kind.split()[1])
        mixture = Mixture([feature_stats(x, y, rank)], int(y.max()) + 1)
        return mixture.sample(labels, g), labels
    xs = []
    for c in y.unique().tolist():
        xc = x[y == c]
        cov = torch.cov(xc.T) + 1e-4 * torch.eye(x.shape[1])
        noise = torch.randn(per_class, x.shape[1], generator=g)
        xs.append(xc.mean(0) + noise @ torch.linalg.cholesky(cov).T)
    return torch.cat(xs), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domain", default="digits")
    ap.add_argument("--out")
    ap.add_argument("--rounds", type=int, default=10, help="(fewer: a smoke run)")
    args = ap.parse_args()
    out = args.out or f"federated_head_{args.domain}"
    info = run_info()
    from da3.bench.run import PRESETS

    proto = dict(PRESETS["quick"]["accuracy"])
    values = {**proto, "epochs": None, "domain": "fleet", "data": args.domain, "clients": 8}
    values |= {"rounds": args.rounds, "partition": "by-class:3", "local_epochs": 3}
    settings = FederateSettings.from_values(values | {"server_momentum": 0.5})
    with tempfile.TemporaryDirectory(prefix="da3-fedhead-") as store:
        run = federate(settings, store, echo=lambda line: print(f"  {line}", flush=True))
        model, domain, data = build_domain(settings)
        from da3.io import read_tensors

        domain.model.load_domain_state(read_tensors(run.file))
    net = domain.model
    fleet = evaluate(net, data.test.images, data.test.labels, model.preprocess, 64)["accuracy"]
    x, y = head_inputs(net, model.preprocess, data.train)
    xt, yt = head_inputs(net, model.preprocess, data.test)
    lr = domain.config.head_lr or domain.config.lr
    rows = [{"head": f"the fleet's (after round {args.rounds})", "epochs": 0, "test": fleet}]
    for epochs in (10, 30):
        acc = refit(net.head, x, y, xt, yt, lr, epochs, seed=0)
        rows.append({"head": "re-fit on all training features", "epochs": epochs, "test": acc})
        for kind in ("full", "rank 16", "diagonal"):
            vx, vy = virtual(x, y, kind, 500, seed=0)
            acc = refit(net.head, vx, vy, xt, yt, lr, epochs, seed=0)
            label = f"re-fit on virtual features, Gaussian per class: {kind}"
            rows.append({"head": label, "epochs": epochs, "test": acc})
        print(rows[-4:], flush=True)
    payload = {"domain": args.domain, "settings": settings.to_values(), "rows": rows, "info": info}
    md = header(
        info,
        f"Head or adaptors: a fleet's {args.domain} domain under label skew",
        f"- fleet: quick protocol, 8 clients, by-class:3, {args.rounds} rounds of 3 local "
        "epochs, FedAvgM "
        "momentum 0.5, seed 0; its adaptors kept, its head re-fitted alone (Adam at the "
        f"head's learning rate {lr:g}, batch 32, from the fleet's head)\n",
    )
    md += "| head | epochs | test top-1 |\n|---|---|---|\n"
    md += "".join(f"| {r['head']} | {r['epochs']} | {r['test']:.3f} |\n" for r in rows)
    save(RESULTS, out, payload, md)


if __name__ == "__main__":
    main()
