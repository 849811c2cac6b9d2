"""Torch-free checks of uploaded model files: safetensors layout and pickle sniffing."""

from __future__ import annotations

import io
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save as save_safetensors

from models.upload_check import UploadFormatError, inspect_safetensors, sniff_pickle


def _weights() -> bytes:
    return save_safetensors({"a.weight": torch.zeros(4, 3), "a.bias": torch.ones(4),
                             "steps": torch.zeros(1, dtype=torch.int64)})


def test_safetensors_header_is_read_without_torch_tensors() -> None:
    info = inspect_safetensors(_weights())
    assert info.tensors["a.weight"] == ("F32", (4, 3))
    assert info.parameters == 16  # the int64 counter is not a parameter


@pytest.mark.parametrize("cut", [1, 7, 40, 60])
def test_truncated_safetensors_is_refused(cut: int) -> None:
    data = _weights()
    with pytest.raises(UploadFormatError, match="expected"):
        inspect_safetensors(data[:-cut] if cut < 60 else data[:cut])


def test_safetensors_with_a_lying_header_is_refused() -> None:
    data = bytearray(_weights())
    data[:8] = (len(data) * 2).to_bytes(8, "little")
    with pytest.raises(UploadFormatError, match="truncated"):
        inspect_safetensors(bytes(data))


def test_random_bytes_are_not_safetensors() -> None:
    with pytest.raises(UploadFormatError):
        inspect_safetensors(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")


def test_pickles_torch_archives_and_torchscript_are_recognised() -> None:
    assert "pickle" in (sniff_pickle(pickle.dumps({"w": [1, 2]})) or "")
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    assert "torch.save" in (sniff_pickle(buffer.getvalue()) or "")
    scripted = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    assert "TorchScript" in (sniff_pickle(scripted.getvalue()) or "")
    assert sniff_pickle(b"anything", "model.pth") is not None
    assert sniff_pickle(_weights(), "weights.safetensors") is None
    plain_zip = io.BytesIO()
    with zipfile.ZipFile(plain_zip, "w") as archive:
        archive.writestr("a.png", b"x")
    assert sniff_pickle(plain_zip.getvalue(), "data.zip") is None
