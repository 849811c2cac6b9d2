"""Open Inference Protocol latency: tritonclient's infer, JSON against binary tensors, beside the bare
model's forward on the same batch, in the same run.

    .venv/bin/python -m bench.oip [--batch 64] [--repeats 30] [--out bench/results]

Starts ``adversa serve`` (embedded Redis, one worker, the gateway on a free port) in a temporary var
directory, then times, round-robin (``bench.attacks.time_round_robin``), on the first ``--batch``
Fashion-MNIST test images and the hosted ``fmnist-cnn``:

* ``tritonclient.http`` infer with the input and every output as JSON;
* the same with the input and every output as binary tensors (tritonclient's default);
* the model's forward on the same batch in this process (``torch.no_grad``), the floor the service
  adds HTTP, validation, Redis and the worker's queue hop to.

The machine is shared: beside each row, the CPU cores other processes kept busy meanwhile (the
service's own gateway, worker and Redis count as work, not as load; they are reported apart).
Writes ``oip.md`` and ``oip.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import torch
import tritonclient.http as triton

from bench.attacks import busy_seconds, command_line
from models.datasets import load_split
from models.manifest import CardIndex
from models.registry import load_module

MODEL = "fmnist-cnn"
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(var: Path, port: int, workers: int | None = None,
          ready: str = "/v2/health/ready") -> subprocess.Popen[bytes]:
    """``adversa serve`` (embedded Redis; ``workers`` workers, else its default) on ``var``;
    returns once ``ready`` answers 200."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "ADVERSA_REDIS_URL")}
    env.update({"ADVERSA_VAR_DIR": str(var), "PYTHONPATH": str(REPO)})
    log = (var / "serve.log").open("wb")
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    if workers is not None:
        command += ["--workers", str(workers)]
    serve = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready}", timeout=5).status_code == 200:
                return serve
        except httpx.TransportError:
            pass
        if serve.poll() is not None or time.monotonic() > deadline:
            serve.kill()
            raise SystemExit("the service did not start:\n" + (var / "serve.log").read_text()[-3000:])
        time.sleep(0.5)


def tree_cpu(process: psutil.Process) -> float:
    """CPU seconds of a process and its children (gateway, worker, Redis)."""
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def timed_rows(rows: dict[str, Any], repeats: int, service: psutil.Process) -> dict[str, dict[str, Any]]:
    """Every row ``repeats`` times round-robin after one warm-up each: p50/p90 ms, the service's CPU
    per call and the cores other processes kept busy."""
    for once in rows.values():
        once()
    times: dict[str, list[float]] = {name: [] for name in rows}
    served = dict.fromkeys(rows, 0.0)
    others = dict.fromkeys(rows, 0.0)
    for _ in range(repeats):
        for name, once in rows.items():
            busy0, own0, tree0 = busy_seconds(), time.process_time(), tree_cpu(service)
            begin = time.perf_counter()
            once()
            times[name].append(time.perf_counter() - begin)
            busy1, own1, tree1 = busy_seconds(), time.process_time(), tree_cpu(service)
            served[name] += tree1 - tree0
            if busy0 is not None and busy1 is not None:
                others[name] += max(0.0, busy1 - busy0 - (own1 - own0) - (tree1 - tree0))
    return {name: {"p50_ms": 1000 * statistics.median(t), "p90_ms": 1000 * float(np.percentile(t, 90)),
                   "service_cpu_ms_per_call": 1000 * served[name] / repeats,
                   "other_load_cores": others[name] / sum(t)} for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)

    x, _ = load_split("fashion-mnist:test").slice(0, args.batch)
    x = x.astype(np.float32)
    directory = CardIndex.default().directory(MODEL)
    assert directory is not None, f"{MODEL} is not hosted here"
    _, module = load_module(directory)
    tensor_x = torch.from_numpy(x)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        serve = start(Path(tmp), port)
        client = triton.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=120)
        try:
            json_input = triton.InferInput("input", list(x.shape), "FP32")
            json_input.set_data_from_numpy(x, binary_data=False)
            binary_input = triton.InferInput("input", list(x.shape), "FP32")
            binary_input.set_data_from_numpy(x, binary_data=True)
            names = ("label", "probabilities", "logits")
            json_outputs = [triton.InferRequestedOutput(n, binary_data=False) for n in names]
            binary_outputs = [triton.InferRequestedOutput(n, binary_data=True) for n in names]

            def forward() -> Any:
                with torch.no_grad():
                    return module(tensor_x)

            rows = {
                "tritonclient infer, JSON": lambda: client.infer(MODEL, [json_input], outputs=json_outputs),
                "tritonclient infer, binary": lambda: client.infer(MODEL, [binary_input],
                                                                   outputs=binary_outputs),
                "bare model forward": forward,
            }
            labels = [client.infer(MODEL, [i], outputs=o).as_numpy("label") for i, o in
                      ((json_input, json_outputs), (binary_input, binary_outputs))]
            assert (labels[0] == labels[1]).all() and (labels[0] == forward().argmax(1).numpy()).all()
            measured = timed_rows(rows, args.repeats, psutil.Process(serve.pid))
            request_bytes = {"JSON": len(json.dumps([float(v) for v in x.ravel()])), "binary": x.nbytes}
        finally:
            client.close()
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=60)

    result = {
        "command": command_line("oip", argv),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "model": MODEL, "batch": args.batch, "repeats": args.repeats,
        "input_bytes_approx": request_bytes, "rows": measured,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "oip.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "oip.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    forward = result["rows"]["bare model forward"]["p50_ms"]
    machine = result["machine"]
    lines = [
        f"# Open Inference Protocol latency ({result['model']}, batch {result['batch']})", "",
        f"`{result['command']}` ({result['date']}; {machine['cpu_count']} CPU cores, "
        f"{machine['torch_threads']} torch threads, load average {machine['loadavg_before'][0]:.2f} before, "
        f"{machine['loadavg_after'][0]:.2f} after: the machine is shared)", "",
        f"{result['repeats']} calls per row, round-robin, after one warm-up each. Service CPU: the "
        "gateway's, worker's and Redis's CPU time per call. Other load: CPU cores other processes kept "
        "busy meanwhile: near the core count, every row ran on a contended machine and its absolute "
        "figures are inflated; the rows ran interleaved, so their ratios are the comparison.", "",
        "| row | p50 ms | p90 ms | p50 / forward | service CPU ms per call | other load (cores) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['p50_ms'] / forward:.1f}x "
                     f"| {row['service_cpu_ms_per_call']:.1f} | {row['other_load_cores']:.2f} |")
    lines += ["", f"Input as JSON text about {result['input_bytes_approx']['JSON']} bytes, as binary "
              f"{result['input_bytes_approx']['binary']} bytes.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
