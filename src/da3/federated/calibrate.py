"""Head calibration after the rounds: the server re-fits the domain's head on features drawn
from the devices' per-class feature statistics (after CCVR: Luo et al., "No Fear of
Heterogeneity: Classifier Calibration for Federated Learning with Non-IID Data", NeurIPS 2021).

Under label skew (each device holding a few of the classes) the averaged head is what falls
behind: refitting only the head of a federated DA3 domain on the pooled training images'
features brings it within about a point of DA3 trained on the pooled data (docs/benchmark.md),
so the adaptors learned together are good and the head is the part to mend. No device may send
its images or their features, so each sends, for every class it holds, the mean of its
images' features (the head's input under the final global state) and the ``rank`` largest
principal directions of their spread (scaled by their standard deviations) plus what is left
per feature: a Gaussian of low rank per class and device. The server draws the same number of
virtual features for every class from the mixture of the devices' Gaussians of that class
(each weighted by its count) and trains the head alone on them, from the averaged head.
A device sends ``(rank + 2) x feature_dim`` floats per class it holds, once: for Lite0 at
rank 16, 90 KiB a class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from da3.errors import Da3Error

# a device summarises at most this many images of a class (the first ones of its shard)
IMAGES_PER_CLASS = 1024
VIRTUAL_PER_CLASS = 500  # virtual features per class the head is trained on, each epoch
EPOCHS = 10
BATCH = 32
MAX_RANK = 256


def check_rank(rank: int) -> None:
    if not 0 <= rank <= MAX_RANK:
        raise Da3Error(f"--calibrate-head must be between 0 (off) and {MAX_RANK}, got {rank}")


def feature_stats(features: torch.Tensor, labels: torch.Tensor, rank: int) -> dict:
    """One device's statistics of ``features`` (N x D, the head's input) by class: the
    tensors it sends. ``classes`` (C'), ``counts`` (C'), ``means`` (C' x D), ``components``
    (C' x D x rank: principal directions times their standard deviations, zero where a class
    has fewer images than directions), ``residual`` (C' x D: the standard deviation per
    feature of what the components leave)."""
    features = features.float()
    classes = torch.unique(labels)
    d = features.shape[1]
    counts, means, comps, resid = [], [], [], []
    for c in classes.tolist():
        x = features[labels == c][:IMAGES_PER_CLASS]
        n = len(x)
        mean = x.mean(0)
        z = x - mean
        comp = torch.zeros(d, rank)
        left = z
        if n > 1 and rank:
            _, s, vh = torch.linalg.svd(z, full_matrices=False)
            k = min(rank, len(s))
            comp[:, :k] = vh[:k].T * (s[:k] / math.sqrt(n - 1))
            left = z - (z @ vh[:k].T) @ vh[:k]
        counts.append(n)
        means.append(mean)
        comps.append(comp)
        resid.append(left.pow(2).sum(0).div(max(n - 1, 1)).sqrt())
    return {
        "classes": classes.to(torch.int64),
        "counts": torch.tensor(counts, dtype=torch.int64),
        "means": torch.stack(means),
        "components": torch.stack(comps),
        "residual": torch.stack(resid),
    }


def device_stats(model, images, labels, preprocess, rank: int, batch: int = 64) -> dict:
    """:func:`feature_stats` of a device's images under ``model`` (an AdaptedModel; eval
    mode, no augmentation), computed ``batch`` images at a time; at most
    :data:`IMAGES_PER_CLASS` images of a class are kept."""
    was = model.training
    model.eval()
    kept: dict[int, int] = {}
    rows, ys = [], []
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(labels), batch):
            y = labels[start : start + batch]
            take = []
            for i, c in enumerate(y.tolist()):
                if kept.get(c, 0) < IMAGES_PER_CLASS:
                    kept[c] = kept.get(c, 0) + 1
                    take.append(i)
            if not take:
                continue
            idx = torch.tensor(take)
            x = preprocess(images[start : start + batch][idx].to(device))
            rows.append(model.features(x).float().cpu())
            ys.append(y[idx])
    model.train(was)
    return feature_stats(torch.cat(rows), torch.cat(ys), rank)


class Mixture:
    """The virtual features: per class, the mixture of the devices' Gaussians of it."""

    def __init__(self, stats: list[dict], num_classes: int):
        means, comps, resid, owner, weight = [], [], [], [], []
        for s in stats:
            for j, c in enumerate(s["classes"].tolist()):
                if not 0 <= c < num_classes:
                    raise Da3Error(f"a device sent statistics of class {c}, not the domain's")
                means.append(s["means"][j])
                comps.append(s["components"][j])
                resid.append(s["residual"][j])
                owner.append(c)
                weight.append(float(s["counts"][j]))
        if not means:
            raise Da3Error("no device sent feature statistics: the head cannot be calibrated")
        self.means = torch.stack(means).float()
        self.comps = torch.stack(comps).float()
        self.resid = torch.stack(resid).float()
        self.owner = torch.tensor(owner)
        self.weight = torch.tensor(weight)
        self.classes = sorted(set(owner))  # classes no device holds get no virtual features

    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One virtual feature per label, each from a component of its class drawn by
        count."""
        pick = torch.empty(len(labels), dtype=torch.int64)
        for c in labels.unique().tolist():
            where = (labels == c).nonzero().flatten()
            comps = (self.owner == c).nonzero().flatten()
            w = self.weight[comps]
            chosen = torch.multinomial(w / w.sum(), len(where), True, generator=generator)
            pick[where] = comps[chosen]
        n, rank, d = len(labels), self.comps.shape[2], self.means.shape[1]
        z = torch.randn(n, rank, generator=generator)
        e = torch.randn(n, d, generator=generator)
        return (
            self.means[pick]
            + torch.einsum("ndk,nk->nd", self.comps[pick], z)
            + self.resid[pick] * e
        )


def calibrate_head(head: nn.Module, stats: list[dict], lr: float, seed: int) -> dict:
    """Train ``head`` (an ``nn.Linear`` over the features) alone on virtual features from
    ``stats`` (each device's :func:`feature_stats`): :data:`EPOCHS` epochs of
    :data:`VIRTUAL_PER_CLASS` features of every class held by some device, batches of
    :data:`BATCH`, Adam at ``lr``, from the head as it is. Returns what was done."""
    if not isinstance(head, nn.Linear):
        kind = type(head).__name__
        raise Da3Error(f"head calibration needs a linear head, this method's is a {kind}")
    mixture = Mixture(stats, head.out_features)
    if mixture.means.shape[1] != head.in_features:
        raise Da3Error(
            f"devices sent features of {mixture.means.shape[1]} values, the head reads "
            f"{head.in_features}"
        )
    g = torch.Generator().manual_seed(seed)
    classes = torch.tensor(mixture.classes)
    labels = classes.repeat_interleave(VIRTUAL_PER_CLASS)
    params = list(head.parameters())
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    steps = 0
    for _ in range(EPOCHS):
        order = labels[torch.randperm(len(labels), generator=g)]
        for start in range(0, len(order), BATCH):
            y = order[start : start + BATCH]
            x = mixture.sample(y, g)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(head(x), y).backward()
            opt.step()
            steps += 1
    for p, w in zip(params, was, strict=True):
        p.grad = None
        p.requires_grad_(w)
    return {
        "classes": len(mixture.classes),
        "components": len(mixture.owner),
        "virtual_per_class": VIRTUAL_PER_CLASS,
        "epochs": EPOCHS,
        "steps": steps,
    }
