"""Train the hosted models on Fashion-MNIST and write their weights and cards.

``make models`` runs ``python -m models.train``; the results are committed under
``models/hosted/<name>/<version>/`` so that ``make run`` needs no training.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.architectures import build
from models.datasets import FASHION_MNIST_CLASSES, load_split
from models.manifest import HOSTED_DIR, Lineage, ModelCard
from models.registry import assemble, sha256_hex, weights_bytes, write_model

FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)


def evaluate(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    module.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), batch):
            correct += int((module(x[start : start + batch]).argmax(1) == y[start : start + batch]).sum())
    return correct / len(x)


def train_classifier(
    name: str, architecture: str, epochs: int, seed: int, lr: float, batch_size: int,
    root: Path, version: int = 1, description: str = "",
) -> ModelCard:
    torch.manual_seed(seed)
    x_np, y_np = load_split("fashion-mnist:train").slice(0, 60_000)
    xt_np, yt_np = load_split("fashion-mnist:test").slice(0, 10_000)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    xt, yt = torch.from_numpy(xt_np), torch.from_numpy(yt_np)
    shape = (1, 28, 28)
    body = build(architecture, shape, len(FASHION_MNIST_CLASSES))
    draft = ModelCard(
        name=name, version=version, architecture=architecture, input_shape=shape,
        bounds=(0.0, 1.0), mean=FMNIST_MEAN, std=FMNIST_STD, classes=FASHION_MNIST_CLASSES,
        sha256="0" * 64,
        lineage=Lineage(recipe="standard", data="fashion-mnist:train", seed=seed,
                        parameters={}, created="-"),
    )
    module = assemble(draft, body)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    steps = epochs * (len(x) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for epoch in range(epochs):
        module.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for i in range(len(x) // batch_size):
            idx = order[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(module(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach())
        acc = evaluate(module, xt, yt)
        print(f"{name} epoch {epoch + 1}/{epochs}: loss {total / (i + 1):.4f}, test accuracy {acc:.4f}")
    accuracy = evaluate(module, xt, yt)
    weights = weights_bytes(body)
    card = draft.model_copy(update={
        "sha256": sha256_hex(weights),
        "metrics": {"clean_accuracy": round(accuracy, 4)},
        "description": description,
        "lineage": Lineage(
            recipe="standard", data="fashion-mnist:train", seed=seed,
            parameters={"epochs": epochs, "optimizer": "adam", "lr": lr, "schedule": "one-cycle",
                        "batch_size": batch_size, "torch": torch.__version__.split("+")[0],
                        "train_seconds": round(time.perf_counter() - started, 1)},
            created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        ),
    })
    write_model(root, card, weights)
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=HOSTED_DIR)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    np.random.seed(args.seed)
    card = train_classifier(
        "fmnist-cnn", "small-cnn", args.epochs, args.seed, 2e-3, 128, args.root,
        description="Small CNN (2 conv + 2 dense) trained on Fashion-MNIST, standard training.",
    )
    print(f"wrote {card.ref}: clean accuracy {card.metrics['clean_accuracy']:.4f}")


if __name__ == "__main__":
    main()
