"""``POST /v2/models/{name}/infer``: predictions in the KServe Open Inference Protocol v2 shape.

The gateway holds no model: it validates the tensor, puts a job on the high-priority ``predict``
queue and waits for a worker's answer.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from rq.job import JobStatus

from service.deps import QueueDep, RegistryDep, SettingsDep, TeamDep, visible_card
from service.errors import Problem, invalid
from service.inputs import array_to_nchw, check_count
from service.metrics import JOBS
from workers.artifacts import npy_bytes
from workers.specs import PredictJob

router = APIRouter(prefix="/v2/models", tags=["inference"])


class InferTensor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int] = Field(min_length=1)
    datatype: Literal["FP32", "UINT8"]
    data: list[Any]
    parameters: dict[str, Any] | None = None


class InferParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    reject: bool = Field(default=False, description="detection-and-reject mode")


class InferRequest(BaseModel):
    """OIP v2 request: one input tensor, FP32 NCHW in the model's bounds or UINT8 NHWC."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    inputs: list[InferTensor] = Field(min_length=1, max_length=1)
    outputs: list[dict[str, Any]] | None = None
    parameters: InferParameters | None = None


def _tensor(field: str, tensor: InferTensor) -> np.ndarray:
    dtype = np.float32 if tensor.datatype == "FP32" else np.uint8
    if any(d < 1 for d in tensor.shape):
        raise invalid(f"{field}.shape", f"expected positive dimensions, got {tensor.shape}")
    try:
        flat = np.asarray(tensor.data, dtype=np.float64).reshape(-1)
    except (ValueError, TypeError):
        raise invalid(f"{field}.data", "expected numbers (flat or nested lists)") from None
    expected = int(np.prod(tensor.shape))
    if flat.size != expected:
        raise invalid(f"{field}.data", f"expected {expected} values for shape {tensor.shape}, "
                                       f"got {flat.size}")
    if dtype == np.uint8 and (
        (flat < 0).any() or (flat > 255).any() or (flat != np.round(flat)).any()
    ):
        raise invalid(f"{field}.data", "expected integers in [0, 255] for UINT8")
    return flat.astype(dtype).reshape(tensor.shape)


@router.post("/{ref}/infer")
def infer(ref: str, body: InferRequest, settings: SettingsDep, queues: QueueDep,
          index: RegistryDep, team: TeamDep) -> dict[str, Any]:
    """Predict classes for a batch (``parameters.reject=true``: detection-and-reject)."""
    card = visible_card(index, ref, team)
    reject = body.parameters is not None and body.parameters.reject
    if reject and index.detector(card, team) is None:
        raise Problem(409, f"{card.ref} has no calibrated detector; calibrate one with POST "
                           f"/v1/defenses {{\"model\": \"{card.ref}\", \"defense\": {{\"name\": "
                           f"\"feature-squeezing\", \"fpr\": 0.05}}}}, wait for the job to "
                           "succeed, then retry", field="parameters.reject", code="no-detector")
    x = array_to_nchw("inputs[0]", _tensor("inputs[0]", body.inputs[0]), card)
    check_count("inputs[0].shape", x.shape[0], settings.max_infer_inputs)
    job_id = uuid.uuid4().hex
    payload = PredictJob(job_id=job_id, model=card.ref, array=base64.b64encode(npy_bytes(x)).decode(),
                         reject=reject, team=team if reject else None)
    job = queues.enqueue("predict", "workers.jobs.run_predict", payload.model_dump(),
                         job_id=job_id, meta={"kind": "predict", "team": team, "model": card.ref},
                         timeout=settings.predict_timeout_s * 4, result_ttl=300)
    JOBS.labels("predict").inc()
    job.latest_result(timeout=settings.predict_timeout_s)
    status = job.get_status()
    if status != JobStatus.FINISHED:
        if status in (JobStatus.QUEUED, JobStatus.STARTED):
            if status == JobStatus.QUEUED:
                job.cancel()
            raise Problem(504, f"no worker answered within {settings.predict_timeout_s}s",
                          code="predict-timeout")
        error = job.meta.get("error") or {}
        raise Problem(503, f"prediction failed: {error.get('message', 'unknown error')}",
                      code="predict-failed")
    out = job.return_value() or {}
    n, k = x.shape[0], card.num_classes
    outputs = [
        {"name": "label", "datatype": "INT64", "shape": [n], "data": out["labels"]},
        {"name": "probabilities", "datatype": "FP32", "shape": [n, k],
         "data": np.asarray(out["probabilities"], dtype=np.float32).ravel().tolist()},
        {"name": "logits", "datatype": "FP32", "shape": [n, k],
         "data": np.asarray(out["logits"], dtype=np.float32).ravel().tolist()},
    ]
    answer: dict[str, Any] = {
        "model_name": card.name,
        "model_version": str(card.version),
        "id": body.id or job_id,
        "outputs": outputs,
    }
    if reject:
        outputs += [
            {"name": "detector_score", "datatype": "FP32", "shape": [n], "data": out["scores"]},
            {"name": "threshold", "datatype": "FP32", "shape": [n], "data": [out["threshold"]] * n},
            {"name": "rejected", "datatype": "BOOL", "shape": [n], "data": out["rejected"]},
        ]
        answer["parameters"] = {"detector": out["detector"], "threshold": out["threshold"]}
    return answer
