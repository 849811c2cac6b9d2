"""Load: Open Inference Protocol infer from concurrent clients, against the bare model's batched
forward in the same run.

    .venv/bin/python -m bench.load [--batches 1 64] [--clients 16] [--seconds 20] [--workers 1]
                                   [--out bench/results]

Starts ``adversa serve`` (embedded Redis, ``--workers`` workers, the gateway on a free port) in a
temporary var directory, then for each batch size: ``--clients`` threads, each with its own HTTP
connection, send ``POST /v2/models/fmnist-cnn/infer`` back to back for ``--seconds`` (binary
input tensor, the ``label`` output as JSON; bodies encoded once beforehand, so the clients cost
little CPU); every answer's labels are checked against the bare model's. Around each load phase,
with the service idle, the bare model's forward (``torch.no_grad``, this process, the same batch)
is timed for ``--bare-seconds``: the ratio is served images/s over the mean of those two.

Reported per batch size: requests, errors (anything but a 200 with the right labels; goal 0),
served images/s, bare forward images/s, their ratio (goal >= 0.8x at batch 64) and request latency
p50/p99. The machine is shared: ``uptime`` before and after goes into the result. Writes
``load.md`` and ``load.json`` into ``--out`` (``load-workers<n>.*`` with ``--workers`` n > 1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from bench.attacks import busy_seconds, command_line
from bench.oip import REPO, free_port
from bench.oip import start as start_serve
from models.datasets import load_split
from models.manifest import HOSTED_DIR, CardIndex
from models.registry import load_module

MODEL = "fmnist-cnn"


def start(var: Path, port: int, workers: int) -> subprocess.Popen[bytes]:
    """``adversa serve`` with its embedded Redis; returns once the model is ready to infer."""
    from workers.cache import card_key

    card = CardIndex([HOSTED_DIR]).card(MODEL)
    assert card is not None
    var.mkdir(parents=True, exist_ok=True)
    # The chunk size a worker would measure once per var dir; a prediction is one chunk anyway.
    (var / "batch_sizes.json").write_text(json.dumps({f"{card_key(card)}:cpu": 128}))
    return start_serve(var, port, workers, ready=f"/v2/models/{MODEL}/ready")


def infer_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """An OIP v2 request with ``x`` as a binary tensor, asking for the ``label`` output as JSON."""
    raw = np.ascontiguousarray(x, dtype=np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "label"}]}).encode()
    return header + raw, {"Content-Type": "application/octet-stream",
                          "Inference-Header-Content-Length": str(len(header))}


def labels_of(response: httpx.Response) -> list[int]:
    document = response.json()
    (output,) = [o for o in document["outputs"] if o["name"] == "label"]
    return [int(v) for v in output["data"]]


def load_phase(url: str, body: bytes, headers: dict[str, str], expected: list[int], clients: int,
               seconds: float) -> dict[str, Any]:
    """``clients`` threads sending ``body`` back to back for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[dict[str, int]] = [{} for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        with httpx.Client(timeout=120) as http:
            barrier.wait()
            while time.monotonic() < stop_at[0]:
                begin = time.perf_counter()
                try:
                    response = http.post(url, content=body, headers=headers)
                    kind = str(response.status_code) if response.status_code != 200 else (
                        "" if labels_of(response) == expected else "wrong labels")
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    kind = type(exc).__name__
                if kind:
                    errors[i][kind] = errors[i].get(kind, 0) + 1
                else:
                    latencies[i].append(time.perf_counter() - begin)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    busy0, own0 = busy_seconds(), time.process_time()
    begin = time.monotonic()
    stop_at[0] = begin + seconds
    barrier.wait()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - begin
    busy1, own1 = busy_seconds(), time.process_time()
    done = [t for per in latencies for t in per]
    merged: dict[str, int] = {}
    for per in errors:
        for kind, count in per.items():
            merged[kind] = merged.get(kind, 0) + count
    return {"requests": len(done) + sum(merged.values()), "ok": len(done), "errors": sum(merged.values()),
            "error_kinds": merged, "wall_s": wall, "requests_per_s": len(done) / wall,
            "p50_ms": 1000 * statistics.median(done) if done else None,
            "p99_ms": 1000 * float(np.percentile(done, 99)) if done else None,
            # all cores busy meanwhile, the service included, minus this process (the clients)
            "machine_busy_cores": None if busy0 is None or busy1 is None else (busy1 - busy0) / wall,
            "client_cores": (own1 - own0) / wall}


def warm_up(url: str, body: bytes, headers: dict[str, str], expected: list[int], tries: int = 5) -> None:
    """One checked prediction before timing; a 504 here is the worker still loading the model on a
    busy machine (the first prediction), so it is asked again, a few times."""
    for _ in range(tries):
        response = httpx.post(url, content=body, headers=headers, timeout=120)
        if response.status_code != 504:
            break
    assert response.status_code == 200 and labels_of(response) == expected, response.text[:500]


def bare_forward(module: torch.nn.Module, x: torch.Tensor, seconds: float) -> float:
    """Images per second of the model's forward on ``x``, back to back for ``seconds``."""
    with torch.no_grad():
        module(x)
        count, begin = 0, time.perf_counter()
        while time.perf_counter() - begin < seconds:
            module(x)
            count += 1
        return count * x.shape[0] / (time.perf_counter() - begin)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="load per batch size")
    parser.add_argument("--bare-seconds", type=float, default=5.0, help="bare forward before and after each")
    parser.add_argument("--workers", type=int, default=1, help="worker processes under serve")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)

    x_all, _ = load_split("fashion-mnist:test").slice(0, max(args.batches))
    x_all = x_all.astype(np.float32)
    directory = CardIndex.default().directory(MODEL)
    assert directory is not None, f"{MODEL} is not hosted here"
    _, module = load_module(directory)
    module.eval()
    load_before, uptime_before = os.getloadavg(), uptime()
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="adversa-load-") as tmp:
        port = free_port()
        serve = start(Path(tmp), port, args.workers)
        url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"
        try:
            for batch in args.batches:
                x = torch.from_numpy(x_all[:batch])
                with torch.no_grad():
                    expected = module(x).argmax(1).tolist()
                body, headers = infer_body(x_all[:batch])
                warm_up(url, body, headers, expected)
                before = bare_forward(module, x, args.bare_seconds)
                phase = load_phase(url, body, headers, expected, args.clients, args.seconds)
                after = bare_forward(module, x, args.bare_seconds)
                bare = (before + after) / 2
                served = phase["requests_per_s"] * batch
                rows[str(batch)] = {**phase, "images_per_s": served, "bare_images_per_s": bare,
                                    "bare_before_after": [before, after], "ratio": served / bare}
        finally:
            serve.terminate()
            serve.wait(timeout=120)

    result = {
        "command": command_line("load", argv),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg(), "uptime_before": uptime_before, "uptime_after": uptime()},
        "model": MODEL, "clients": args.clients, "seconds": args.seconds, "workers": args.workers, "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "load" if args.workers == 1 else f"load-workers{args.workers}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))  # noqa: T201 - a bench's report


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"# Load: OIP infer, {result['clients']} concurrent clients ({result['model']})", "",
        f"`{result['command']}` ({result['date']}; {m['cpu_count']} CPU cores, {m['torch_threads']} torch "
        f"threads; load average {m['loadavg_before'][0]:.2f} before, {m['loadavg_after'][0]:.2f} after: the "
        "machine is shared, these figures were taken under other engineers' load)", "",
        f"`uptime` before: `{m['uptime_before']}`; after: `{m['uptime_after']}`", "",
        f"`adversa serve` (embedded Redis, {result['workers']} worker(s)), {result['seconds']:g} s of load "
        "per batch size; binary input tensor, `label` output. Bare forward: the model's `torch.no_grad` "
        "forward on the same batch in the bench process, timed just before and just after the load with the "
        "service idle. Busy cores: the whole machine's (service, clients and everyone else's) during the "
        "load; in brackets the clients' own.", "",
        "| batch | requests | errors | images/s served | bare forward images/s | served / bare | p50 ms "
        "| p99 ms | busy cores (clients) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, row in result["rows"].items():
        busy = "n/a" if row["machine_busy_cores"] is None else f"{row['machine_busy_cores']:.2f}"
        lines.append(
            f"| {batch} | {row['requests']} | {row['errors']} {row['error_kinds'] or ''} "
            f"| {row['images_per_s']:.0f} | {row['bare_images_per_s']:.0f} | {row['ratio']:.3f}x "
            f"| {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {busy} ({row['client_cores']:.2f}) |")
    lines.append("")
    if "64" in result["rows"]:
        ratio = result["rows"]["64"]["ratio"]
        errors = sum(row["errors"] for row in result["rows"].values())
        lines += [f"Goal at batch 64, served >= 0.8x the bare forward: {'met' if ratio >= 0.8 else 'not met'} "
                  f"({ratio:.2f}x); errors: {errors} (goal 0).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
