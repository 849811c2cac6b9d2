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
    root: Path, version: int = 1, description: str = "", device: str = "cpu",
) -> ModelCard:
    torch.manual_seed(seed)
    x_np, y_np = load_split("fashion-mnist:train").slice(0, 60_000)
    xt_np, yt_np = load_split("fashion-mnist:test").slice(0, 10_000)
    x, y = torch.from_numpy(x_np).to(device), torch.from_numpy(y_np).to(device)
    xt, yt = torch.from_numpy(xt_np).to(device), torch.from_numpy(yt_np).to(device)
    shape = (1, 28, 28)
    body = build(architecture, shape, len(FASHION_MNIST_CLASSES))
    draft = ModelCard(
        name=name, version=version, architecture=architecture, input_shape=shape,
        bounds=(0.0, 1.0), mean=FMNIST_MEAN, std=FMNIST_STD, classes=FASHION_MNIST_CLASSES,
        sha256="0" * 64,
        lineage=Lineage(recipe="standard", data="fashion-mnist:train", seed=seed,
                        parameters={}, created="-"),
    )
    module = assemble(draft, body).to(device)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    steps = epochs * (len(x) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for epoch in range(epochs):
        module.train()
        order = torch.randperm(len(x), generator=generator).to(device)
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
                        "device": device if device == "cpu" else torch.cuda.get_device_name(0),
                        "train_seconds": round(time.perf_counter() - started, 1)},
            created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        ),
    })
    write_model(root, card, weights)
    return card


RECIPES = {
    "fmnist-cnn": dict(
        architecture="small-cnn", epochs=6, lr=2e-3, batch_size=128,
        description="Small CNN (2 conv + 2 dense) trained on Fashion-MNIST, standard training.",
    ),
    "fmnist-resnet18": dict(
        architecture="resnet18-small", epochs=10, lr=2e-3, batch_size=256,
        description="ResNet-18 (3x3 stem, no max-pool) trained on Fashion-MNIST, standard "
                    "training; trained on a GPU (about a minute; hours on 2 CPU cores).",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=HOSTED_DIR)
    parser.add_argument("--only", choices=sorted(RECIPES), action="append",
                        help="train only these hosted models (default: the CPU-friendly fmnist-cnn)")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.use_deterministic_algorithms(True)
    np.random.seed(args.seed)
    for name in args.only or ["fmnist-cnn"]:
        recipe = dict(RECIPES[name])
        if args.epochs is not None:
            recipe["epochs"] = args.epochs
        card = train_classifier(name, seed=args.seed, root=args.root, device=args.device,
                                **recipe)  # type: ignore[arg-type]
        print(f"wrote {card.ref}: clean accuracy {card.metrics['clean_accuracy']:.4f}")


if __name__ == "__main__":
    main()
