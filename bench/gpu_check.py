"""CUDA check of the attack kernels and the attack job, for a machine with a GPU.

    python -m bench.gpu_check --out DIR [--n 512]

Runs FGSM, PGD (Linf, L2) and DeepFool (L2, Linf) on ``fmnist-cnn`` on CUDA and on the CPU with the
same images and seeds, checks bounds, the eps ball, that outputs stay on the model's device and
that the same seed gives the same bits on CUDA, then runs the worker's attack job orchestration
(without RQ) on CUDA. Writes ``gpu-check.json`` to DIR and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from models.datasets import load_split
from models.manifest import CardIndex
from workers import jobs
from workers.attacks.base import flat_norm
from workers.attacks.deepfool import DeepFoolSpec, deepfool
from workers.attacks.fgsm import FGSMSpec, fgsm
from workers.attacks.pgd import PGDSpec, pgd
from workers.cache import ModelCache
from workers.device import configure_numerics
from workers.settings import WorkerSettings

CASES: list[tuple[str, Any, Any, float | None, str | None]] = [
    ("fgsm-linf-0.1", fgsm, FGSMSpec(eps=0.1), 0.1, "linf"),
    ("pgd-linf-0.1-20", pgd, PGDSpec(eps=0.1, steps=20, step_size=0.01), 0.1, "linf"),
    ("pgd-l2-1.0-20", pgd, PGDSpec(eps=1.0, norm="l2", steps=20), 1.0, "l2"),
    ("deepfool-l2", deepfool, DeepFoolSpec(), None, None),
    ("deepfool-linf", deepfool, DeepFoolSpec(norm="linf"), None, None),
]


def timed(fn: Any, device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def run_case(case: tuple[str, Any, Any, float | None, str | None], device: torch.device,
             x_cpu: torch.Tensor, y_cpu: torch.Tensor) -> dict[str, Any]:
    name, kernel, spec, eps, norm = case
    _, model = ModelCache(CardIndex.default(), device).get("fmnist-cnn")
    x, y = x_cpu.to(device), y_cpu.to(device)
    model.logits(x[:8])  # warm-up

    def attack() -> Any:
        return kernel(model, x, y, spec, generator=torch.Generator(device=device).manual_seed(0))

    out, seconds = timed(attack, device)
    again = attack()
    pred = model.logits(out.x_adv).argmax(1)
    correct = model.logits(x).argmax(1) == y
    delta = out.x_adv - x
    row: dict[str, Any] = {
        "attack": name,
        "device": str(device),
        "output_device": str(out.x_adv.device),
        "seconds": round(seconds, 4),
        "images_per_s": round(x.shape[0] / seconds, 1),
        "success_rate": float(((pred != y) & correct).sum() / correct.sum()),
        "in_bounds": bool(out.x_adv.min() >= 0 and out.x_adv.max() <= 1),
        "same_seed_same_bits": bool(torch.equal(out.x_adv, again.x_adv)),
        "median_l2": float(flat_norm(delta, "l2")[(pred != y) & correct].median()),
        "gradients_per_image": float(out.gradients.double().mean()),
    }
    if eps is not None and norm is not None:
        row["inside_ball"] = bool(flat_norm(delta, norm).max() <= eps * (1 + 1e-6))
    return row


def run_job(device: torch.device, data_dir: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as var:
        settings = WorkerSettings(device=str(device), var_dir=Path(var), data_dir=data_dir)
        jobs.install_context(jobs.make_context(settings))
        payload = {"job_id": "gpucheck", "team": "public", "model": "fmnist-cnn",
                   "attack": {"name": "pgd", "eps": 0.1, "steps": 20, "step_size": 0.01},
                   "inputs": {"kind": "dataset", "n": 1000, "dataset": "fashion-mnist:test"},
                   "seed": 0}
        result = jobs._run_attack(payload, None)
        stored = sorted(p.name for p in (Path(var) / "blobs" / "jobs" / "gpucheck").iterdir())
    scores = result["scores"]
    return {"device": str(device), "batch_size": result["batch_size"],
            "seconds": result["seconds"], "clean_accuracy": scores["clean_accuracy"],
            "robust_accuracy": scores["robust_accuracy"], "success_rate": scores["success_rate"],
            "quantized_robust_accuracy": scores["quantized"]["robust_accuracy"],
            "artifacts": stored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    configure_numerics()
    x_np, y_np = load_split("fashion-mnist:test", args.data_dir).slice(0, args.n)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    rows = []
    for case in CASES:
        for device in (cuda, cpu):
            rows.append(run_case(case, device, x, y))
            print(json.dumps(rows[-1]))
    job = {dev: run_job(torch.device(dev), args.data_dir) for dev in ("cuda", "cpu")}
    print(json.dumps(job))
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "python": platform.python_version(), "n": args.n, "kernels": rows, "job": job}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
