"""The warm job path: batch-size calibration remembered per model version and device and shown as
the job's stage (a real RQ job on a real Redis), ADVERSA_TORCH_THREADS applied, and the clean logits
a job computes answering its kernel's first forward."""

from __future__ import annotations

from pathlib import Path

import torch
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer
from torch import nn

from models.manifest import CardIndex
from workers.cache import ModelCache
from workers.classifier import Classifier
from workers.jobs import job_batch_size
from workers.main import apply_threads
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
