"""The warm job path: batch-size calibration remembered per model version and device and shown as
the job's stage (a real RQ job on a real Redis), ADVERSA_TORCH_THREADS applied, the clean logits
a job computes answering its kernel's first forward, scoring that skips the forward passes of
the rows whose logits it already holds (the job's scores and bytes equal a direct computation's), and a
prediction's input read from beside its job."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from torch import nn

from contracts.specs import PREDICT_INPUT_KEY
from models.datasets import load_split
from models.manifest import CardIndex
from service.inputs import npy_bytes
from workers import jobs
from workers.artifacts import npy_bytes as artifact_npy
from workers.attacks.base import project
from workers.attacks.pgd import PGDSpec, pgd
from workers.cache import ModelCache
from workers.classifier import Classifier
from workers.jobs import Context, install_context, job_batch_size, make_context
from workers.liveness import HeartbeatWorker
from workers.main import apply_threads
from workers.scores import evaluate, logits_reusing, quantize_in_ball, rows_equal, summarize
from workers.settings import WorkerSettings


def tiny_classifier() -> Classifier:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval().requires_grad_(False)
    return Classifier(module, 10, (1, 28, 28))


def test_calibration_is_a_stage_and_is_remembered_per_version_and_device(
    tmp_path: Path, redis: Redis
) -> None:
    tuning = tmp_path / "batch_sizes.json"
    cache = ModelCache(CardIndex.default(), torch.device("cpu"), tuning_file=tuning)
    card, model = cache.resolve("fmnist-cnn"), tiny_classifier()
    stages: list[dict[str, object]] = []
    queue = Queue("warm-test", connection=redis, serializer=JSONSerializer)
    job = queue.enqueue_call("workers.jobs.run_attack", args=({},))
    save_meta = job.save_meta

    def record() -> None:  # the real save, and what it saved
        stages.append(dict(job.meta["stage"]))
        save_meta()

    job.save_meta = record  # type: ignore[method-assign]

    size, source = job_batch_size(cache, card, model, None, job)
    assert source == "calibrated" and cache.calibrations == 1
    assert stages and all(s["phase"] == "calibrating" and s["model"] == card.ref for s in stages)
    assert [s["candidate"] for s in stages] == list(range(1, len(stages) + 1))
    assert size in {s["batch_size"] for s in stages}
    stored = queue.fetch_job(job.id)
    assert stored is not None and stored.meta["stage"]["phase"] == "calibrating"

    # The second job on the model, in this worker or in a new one on the same var dir: no calibration.
    assert job_batch_size(cache, card, model, None, None) == (size, "remembered")
    restarted = ModelCache(CardIndex.default(), torch.device("cpu"), tuning_file=tuning)
    assert job_batch_size(restarted, card, model, None, None) == (size, "remembered")
    assert restarted.calibrations == 0 and cache.calibrations == 1
    assert job_batch_size(restarted, card, model, 7, None) == (7, "job")
    # Another model version (other weights) is calibrated on its own.
    other = restarted.resolve("fmnist-cnn-fgsm-at")
    assert restarted.known_batch_size(other) is None
    # A size chosen at registration (on the card) wins, without calibration.
    registered = card.model_copy(update={"batch_size": {"cpu": 48}})
    assert job_batch_size(restarted, registered, model, None, None) == (48, "remembered")
    assert restarted.calibrations == 0


def test_torch_threads_setting_is_applied() -> None:
    before = torch.get_num_threads()
    try:
        assert apply_threads(WorkerSettings(torch_threads=1)) == 1 == torch.get_num_threads()
        assert apply_threads(WorkerSettings()) == 1  # unset: left as it is
    finally:
        torch.set_num_threads(before)
    assert WorkerSettings(preload="none").preload_refs == []
    assert WorkerSettings(preload="hosted").preload_refs is None
    assert WorkerSettings(preload="fmnist-cnn,fmnist-resnet18@1").preload_refs == ["fmnist-cnn",
                                                                                   "fmnist-resnet18@1"]


def test_remembered_clean_logits_answer_the_kernels_first_forward() -> None:
    model = tiny_classifier()
    x = torch.rand(10, 1, 28, 28)
    clean = model.predict(x, 4, remember=True)
    calls = 0
    forward = model.module.forward

    def counting(inputs: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return forward(inputs)

    model.module.forward = counting  # type: ignore[method-assign]
    assert torch.equal(model.logits(x[4:8]), clean[4:8]) and calls == 0
    assert model.queries == 14  # the kernel's ask still counts
    model.logits(x[4:7])  # another chunk: a forward pass
    assert calls == 1
    x[5] += 0.5  # the data changed since: a forward pass, on the new values
    assert not torch.equal(model.logits(x[4:8]), clean[4:8]) and calls == 2
    model.forget()
    model.logits(x[0:4])
    assert calls == 3


def test_scoring_forwards_only_the_rows_whose_logits_it_lacks() -> None:
    model = tiny_classifier()
    x = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    known_logits = model.predict(x, 16)
    changed = x.clone()
    changed[20] = changed[20].flip(-1)
    changed[39, 0, 0, 0] = torch.nextafter(changed[39, 0, 0, 0], torch.tensor(2.0))  # one ulp
    same = rows_equal(changed, x)
    assert same.sum() == 38 and not same[20] and not same[39]
    model.reset_counters()
    logits = logits_reusing(model, changed, 16, known_logits, same)
    assert model.queries == 2  # the two changed rows, and only they
    assert torch.equal(logits[same], known_logits[same])
    assert torch.equal(logits[~same], model.predict(changed[~same], 16))
    assert torch.allclose(logits, model.predict(changed, 16), atol=1e-5)  # a fresh pass, to rounding
    zero = torch.zeros(1, 3)
    assert not rows_equal(zero, -zero).any() and rows_equal(zero, zero.clone()).all()


def test_pgd_returns_the_models_logits_on_each_row_it_returns() -> None:
    """The kernel's logits (which the job's scores take) are the model's on the returned rows: early
    stopped, last iterates, and rows it never attacked; they match a fresh forward to rounding."""
    cache = ModelCache(CardIndex.default(), torch.device("cpu"))
    _, model = cache.get("fmnist-cnn")
    x_np, y_np = load_split("fashion-mnist:test").slice(0, 24)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    for spec in (PGDSpec(eps=0.1, steps=5, step_size=0.03), PGDSpec(eps=0.02, steps=3, restarts=2),
                 PGDSpec(eps=0.05, steps=3, early_stop=False)):
        out = pgd(model, x, y, spec, generator=torch.Generator().manual_seed(0))
        assert out.logits is not None and out.logits.shape == (24, 10)
        fresh = model.predict(out.x_adv, 24)
        assert torch.allclose(out.logits, fresh, atol=1e-5), (spec, (out.logits - fresh).abs().max())
        assert torch.equal(out.logits.argmax(1), fresh.argmax(1))


@pytest.fixture
def worker_context(tmp_path: Path) -> Iterator[Context]:
    """The context of a worker in this process, on ``tmp_path``; the previous one back afterwards."""
    previous = jobs._context
    context = make_context(WorkerSettings(redis_url="redis://unused", var_dir=tmp_path, device="cpu"))
    install_context(context)
    yield context
    jobs._context = previous


def run_burst(redis: Redis, queue: Queue) -> None:
    """A real worker, in this process (same threads as the direct computation), until the queue is empty."""
    worker = HeartbeatWorker([queue], connection=redis, serializer=JSONSerializer,
                             name=f"warm-test-{uuid.uuid4().hex[:8]}", heartbeat_ttl=60, retries=0,
                             result_ttl=600, queue_prefix="warm-test-")
    worker.work(burst=True, with_scheduler=False)


def test_attack_job_scores_and_bytes_equal_a_direct_computation(worker_context: Context, redis: Redis) -> None:
    """The job's scores (the 8-bit re-score included) and adversarial.npy, bit for bit, against the
    kernel run chunk by chunk, its own logits taken for the rows it returns and a forward pass for
    the 8-bit rows that rounding changed; 40 images in chunks of 16 (a last chunk of 8). Every count
    and rate also equals the one a fresh forward pass of every image gives."""
    context = worker_context
    queue = Queue("warm-test-attacks", connection=redis, serializer=JSONSerializer)
    n, batch, eps, steps, step = 40, 16, 0.1, 5, 0.03
    attack = {"name": "pgd", "norm": "linf", "eps": eps, "steps": steps, "step_size": step}
    job_id = uuid.uuid4().hex
    payload = {"job_id": job_id, "team": "t", "model": "fmnist-cnn", "attack": attack, "seed": 3,
               "batch_size": batch, "inputs": {"kind": "dataset", "dataset": "fashion-mnist:test",
                                               "offset": 100, "n": n}}
    job = queue.enqueue_call("workers.jobs.run_attack", args=(payload,), job_id=job_id, timeout=600)
    run_burst(redis, queue)
    job.refresh()
    result = job.return_value()
    assert result is not None, job.meta

    card, model = context.cache.get("fmnist-cnn")
    x_np, y_np = load_split("fashion-mnist:test").slice(100, n)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    clean_pred = model.predict(x, batch).argmax(1)
    generator = torch.Generator().manual_seed(3)
    spec = PGDSpec(eps=eps, steps=steps, step_size=step)
    outs = [pgd(model, x[i:i + batch], y[i:i + batch], spec, generator=generator) for i in range(0, n, batch)]
    x_adv = project(torch.cat([o.x_adv for o in outs]), x, eps, "linf", card.bounds)
    kernel_logits = torch.cat([o.logits for o in outs if o.logits is not None])
    assert torch.equal(x_adv, torch.cat([o.x_adv for o in outs]))  # nothing for the projection to do
    x_q = quantize_in_ball(x_adv, x, card.bounds, eps, "linf")
    q_logits = logits_reusing(model, x_q, batch, kernel_logits, rows_equal(x_q, x_adv))
    ev = evaluate(model, x, y, x_adv, clean_pred, None, batch, kernel_logits)
    ev_q = evaluate(model, x, y, x_q, clean_pred, None, batch, q_logits)
    scores: dict[str, Any] = result["scores"]
    assert {k: v for k, v in scores.items() if k not in ("gradient_calls", "queries", "quantized")} == \
        summarize(ev, y, clean_pred, True, False)
    quantized = {k: v for k, v in scores["quantized"].items() if k != "ball"}
    assert quantized == summarize(ev_q, y, clean_pred, True, False)
    assert scores["gradient_calls"] == float(torch.cat([o.gradients for o in outs]).double().mean())
    stored = context.store.get(f"jobs/{job_id}/adversarial.npy")
    assert stored == artifact_npy(x_adv.numpy().astype(np.float32))
    # A fresh pass over every image decides every sample the same way.
    fresh = summarize(evaluate(model, x, y, x_adv, clean_pred, None, batch), y, clean_pred, True, False)
    for key in ("robust_accuracy", "success_rate", "successes", "clean_accuracy"):
        assert scores[key] == fresh[key], key
    assert scores["confidence"] == pytest.approx(fresh["confidence"], abs=1e-5)


def test_prediction_reads_its_input_beside_the_job(worker_context: Context, redis: Redis) -> None:
    """The gateway stores the input as raw float32 bytes at PREDICT_INPUT_KEY (not base64 in the
    payload, which RQ compresses twice); an inline .npy still works; a missing or wrongly sized
    input fails the prediction with a code."""
    queue = Queue("warm-test-predict", connection=redis, serializer=JSONSerializer)
    x, _ = load_split("fashion-mnist:test").slice(0, 5)
    x = x.astype(np.float32)

    def enqueue(payload: dict[str, Any], stored: bytes | None = None) -> Job:
        job_id = uuid.uuid4().hex
        if stored is not None:
            redis.set(PREDICT_INPUT_KEY.format(job_id), stored, ex=60)
        return queue.enqueue_call("workers.jobs.run_predict", args=({"job_id": job_id, "model": "fmnist-cnn",
                                                                     **payload},), job_id=job_id, timeout=60)

    beside = enqueue({"shape": list(x.shape)}, x.astype("<f4").tobytes())
    inline = enqueue({"array": base64.b64encode(npy_bytes(x)).decode()})
    missing = enqueue({"shape": list(x.shape)})
    short = enqueue({"shape": list(x.shape)}, x.astype("<f4").tobytes()[:-4])
    run_burst(redis, queue)
    for job in (beside, inline, missing, short):
        job.refresh()
    direct = worker_context.cache.get("fmnist-cnn")[1].predict(torch.from_numpy(x), 256)
    answers = [beside.return_value(), inline.return_value()]
    assert answers[0] is not None and answers[1] is not None
    assert answers[0]["logits"] == answers[1]["logits"] == direct.tolist()
    assert missing.get_status() == "failed" and missing.meta["error"]["code"] == "input-expired"
    assert short.get_status() == "failed" and short.meta["error"]["code"] == "invalid-job"
    assert "expected 15680 bytes" in short.meta["error"]["message"]
