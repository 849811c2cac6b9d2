"""Parsing uploaded data sets (``service.dataset_upload``): the accepted layouts, and every hostile
archive refused with a 4xx naming the field, quickly and without allocating what it declares."""

from __future__ import annotations

import io
import struct
import tarfile
import time
import zipfile
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.dataset_upload import DatasetUploadSpec, UploadLimits, parse_upload
from service.errors import Problem

LIMITS = UploadLimits(max_bytes=4 * 1024 * 1024, max_files=50, max_samples=1000, max_image_pixels=128 * 128,
                      max_ratio=50.0)
SPEC = DatasetUploadSpec(name="my-eval")


def npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def png(size: tuple[int, int] = (8, 8), mode: str = "RGB", seed: int = 0, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(buffer, format=fmt)
    return buffer.getvalue()


def zip_of(files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_of(files: dict[str, bytes], mode: str = "w:gz",
           links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            archive.addfile(info)
    return buffer.getvalue()


def folder(classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3, top: str = "",
           **image: Any) -> dict[str, bytes]:
    return {f"{top}{c}/{i}.png": png(seed=10 * k + i, **image)
            for k, c in enumerate(classes) for i in range(per_class)}


def refused(filename: str, data: bytes, status: int = 422, spec: DatasetUploadSpec = SPEC,
            limits: UploadLimits = LIMITS) -> str:
    with pytest.raises(Problem) as caught:
        parse_upload(filename, data, spec, limits)
    assert caught.value.status == status, caught.value.detail
    assert caught.value.field is not None and caught.value.field.split(".")[0] in ("data", "spec")
    return caught.value.detail


# --- accepted layouts ----------------------------------------------------------------------------


def test_npz_uint8_nhwc_becomes_nchw() -> None:
    x = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    parsed = parse_upload("d.npz", npz(x=x, y=np.array([0, 1, 2, 1, 0])), SPEC, LIMITS)
    assert parsed.x.shape == (5, 3, 8, 8) and parsed.x.dtype == np.uint8
    assert np.array_equal(parsed.x, x.transpose(0, 3, 1, 2))
    assert parsed.classes == ("0", "1", "2") and parsed.y.dtype == np.int64 and parsed.format == "npz"


def test_npz_uint8_nchw_and_grayscale_nhw() -> None:
    x = np.random.default_rng(1).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    parsed = parse_upload("d.npz", npz(x=x, y=np.arange(4)), SPEC, LIMITS)
    assert np.array_equal(parsed.x, x)
    gray = np.zeros((2, 28, 28), dtype=np.uint8)
    assert parse_upload("g.npz", npz(x=gray, y=np.array([0, 1])), SPEC, LIMITS).x.shape == (2, 1, 28, 28)


def test_npz_float32_in_unit_range_with_class_names() -> None:
    x = np.random.default_rng(2).random((3, 1, 8, 8), dtype=np.float32)
    spec = DatasetUploadSpec(name="f", classes=["a", "b", "c", "d"])
    parsed = parse_upload("d.npz", npz(x=x, y=np.array([3, 0, 1], dtype=np.uint8)), spec, LIMITS)
    assert parsed.x.dtype == np.float32 and parsed.classes == ("a", "b", "c", "d")


def test_npz_layout_can_be_given_when_the_shape_does_not_say() -> None:
    x = np.zeros((2, 3, 4, 3), dtype=np.uint8)  # 3 channels first or last?
    assert "spec.layout" in refused("d.npz", npz(x=x, y=np.array([0, 1])))
    spec = DatasetUploadSpec(name="f", layout="NHWC")
    assert parse_upload("d.npz", npz(x=x, y=np.array([0, 1])), spec, LIMITS).x.shape == (2, 3, 3, 4)


@pytest.mark.parametrize("top", ["", "export/"])
def test_image_folder_zip(top: str) -> None:
    files = folder(top=top)
    files[f"{top}.DS_Store"] = b"junk"
    files[f"__MACOSX/{top}cat/._0.png"] = b"junk"
    parsed = parse_upload("d.zip", zip_of(files), SPEC, LIMITS)
    assert parsed.x.shape == (6, 3, 8, 8) and parsed.classes == ("cat", "dog")
    assert parsed.y.tolist() == [0, 0, 0, 1, 1, 1] and parsed.format == "image-folder"
    expected = np.asarray(Image.open(io.BytesIO(files[f"{top}dog/0.png"]))).transpose(2, 0, 1)
    assert np.array_equal(parsed.x[3], expected)


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_image_folder_tar_grayscale(mode: str) -> None:
    data = tar_of(folder(("a", "b", "c"), per_class=2, mode="L"), mode=mode)
    parsed = parse_upload("d.tar.gz", data, SPEC, LIMITS)
    assert parsed.x.shape == (6, 1, 8, 8) and parsed.classes == ("a", "b", "c")


def test_jpeg_and_png_images_mix_in_one_folder_tree() -> None:
    files = folder()
    files["cat/9.jpg"] = png(fmt="JPEG")
    parsed = parse_upload("d.zip", zip_of(files, zipfile.ZIP_STORED), SPEC, LIMITS)
    assert parsed.x.shape == (7, 3, 8, 8) and parsed.y.tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_given_classes_order_the_labels_and_must_cover_the_folders() -> None:
    spec = DatasetUploadSpec(name="f", classes=["dog", "cat", "bird"])
    parsed = parse_upload("d.zip", zip_of(folder()), spec, LIMITS)
    assert parsed.classes == ("dog", "cat", "bird") and parsed.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert "fish" in refused("d.zip", zip_of(folder(("cat", "fish"))),
                             spec=DatasetUploadSpec(name="f", classes=["cat", "dog"]))


# --- hostile or wrong uploads --------------------------------------------------------------------


def test_path_traversal_and_absolute_paths_are_refused() -> None:
    for name in ("../cat/0.png", "cat/../../0.png", "/cat/0.png", "C:/cat/0.png", "cat\\0.png"):
        files = folder()
        files[name] = png()
        assert "relative path" in refused("d.zip", zip_of(files))
    assert "relative path" in refused("d.tar", tar_of({"../evil.png": png()}, mode="w"))


def test_links_and_devices_are_refused() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("cat/0.png")
        info.external_attr = (0o120777 << 16)  # a symbolic link
        archive.writestr(info, "/etc/passwd")
    assert "symbolic link" in refused("d.zip", buffer.getvalue())
    symlink = tar_of(folder(), links={"cat/x.png": (tarfile.SYMTYPE, "/etc/passwd")})
    assert "symbolic link" in refused("d.tar", symlink)
    hardlink = tar_of(folder(), links={"cat/x.png": (tarfile.LNKTYPE, "cat/0.png")})
    assert "hard link" in refused("d.tar", hardlink)
    assert "device" in refused("d.tar", tar_of(folder(), links={"cat/x.png": (tarfile.CHRTYPE, "")}))


def test_zip_bomb_with_an_honest_huge_size_is_refused_from_the_header() -> None:
    bomb = zip_of({"cat/0.png": bytes(64 * 1024 * 1024)})  # 64 MiB of zeros, ~64 KiB compressed
    started = time.perf_counter()
    assert "bytes expanded" in refused("d.zip", bomb, status=413)
    within = UploadLimits(max_bytes=128 * 1024 * 1024, max_files=50, max_samples=10, max_ratio=50.0)
    assert "zip bomb" in refused("d.zip", bomb, limits=within)
    assert time.perf_counter() - started < 5


def _patch_declared_size(data: bytes, name: bytes, size: int) -> bytes:
    """Rewrite the uncompressed size of ``name`` in both the local and the central header."""
    out = bytearray(data)
    local = out.index(b"PK\x03\x04" + out[4:8])  # the first local header
    assert out[local + 30 : local + 30 + len(name)] == name
    out[local + 22 : local + 26] = struct.pack("<I", size)
    central = out.index(b"PK\x01\x02")
    assert out[central + 46 : central + 46 + len(name)] == name
    out[central + 24 : central + 28] = struct.pack("<I", size)
    return bytes(out)


def test_zip_bomb_with_a_lying_header_is_caught_while_reading() -> None:
    honest = zip_of({"cat/0.png": bytes(3 * 1024 * 1024)})
    lying = _patch_declared_size(honest, b"cat/0.png", 100)
    detail = refused("d.zip", lying)
    assert "intact" in detail or "declared" in detail


def test_a_40000x40000_png_is_refused_from_its_header() -> None:
    tiny = bytearray(png((1, 1)))
    ihdr = tiny.index(b"IHDR")
    tiny[ihdr + 4 : ihdr + 12] = struct.pack(">II", 40000, 40000)
    tiny[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(tiny[ihdr : ihdr + 17])))
    files = folder()
    files["cat/huge.png"] = bytes(tiny)
    started = time.perf_counter()
    detail = refused("d.zip", zip_of(files), status=413)
    assert "40000x40000" in detail or "decompression bomb" in detail
    assert time.perf_counter() - started < 2


def test_too_many_files_and_too_many_samples() -> None:
    assert "files" in refused("d.zip", zip_of(folder(per_class=30)), status=413)
    assert "files" in refused("d.tar", tar_of(folder(per_class=30), mode="w"), status=413)
    x = np.zeros((1001, 1, 2, 2), dtype=np.uint8)
    assert "samples" in refused("d.npz", npz(x=x, y=np.zeros(1001, dtype=np.int64)), status=413)


def test_nested_archives_are_refused() -> None:
    files = folder()
    files["cat/inner.zip"] = zip_of(folder())
    assert "nested archive" in refused("d.zip", zip_of(files))
    files = folder()
    files["dog/x.png"] = tar_of({"a.png": png()})  # a .tar.gz named like an image
    assert "nested archive" in refused("d.tar", tar_of(files, mode="w"))


def test_pickled_npz_member_is_refused() -> None:
    objects = np.array([{"evil": 1}, None], dtype=object)
    buffer = io.BytesIO()
    np.savez(buffer, x=objects, y=np.array([0, 1]))
    assert "pickle" in refused("d.npz", buffer.getvalue())
    raw = zip_of({"x.npy": b"\x80\x04\x95 not a numpy file", "y.npy": b"nope"})
    assert "expected a .npy array" in refused("d.npz", raw)


def test_npz_member_header_is_checked_before_allocating() -> None:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (100_000, 3, 1024, 1024)})
    y = io.BytesIO()
    np.save(y, np.zeros(2, dtype=np.int64))
    data = zip_of({"x.npy": header.getvalue() + bytes(16), "y.npy": y.getvalue()})
    assert "bytes of data" in refused("d.npz", data, status=413)


def test_wrong_labels_and_values() -> None:
    x = np.zeros((3, 1, 4, 4), dtype=np.uint8)
    spec = DatasetUploadSpec(name="f", classes=["a", "b"])
    assert "expected labels in [0, 1]" in refused("d.npz", npz(x=x, y=np.array([0, 1, 2])), spec=spec)
    assert "labels >= 0" in refused("d.npz", npz(x=x, y=np.array([0, -1, 1])))
    assert "one label per sample" in refused("d.npz", npz(x=x, y=np.array([0, 1])))
    assert "integer labels" in refused("d.npz", npz(x=x, y=np.array([0.0, 1.0, 1.0])))
    assert "in [0, 1]" in refused("d.npz", npz(x=np.full((3, 1, 4, 4), 2.0, dtype=np.float32), y=np.arange(3)))
    assert "dtype uint8" in refused("d.npz", npz(x=x.astype(np.float64), y=np.arange(3)))
    assert "x and y" in refused("d.npz", npz(x=x))


def test_mixed_image_sizes_and_colours_are_refused() -> None:
    files = folder()
    files["dog/odd.png"] = png((9, 8))
    assert "expected every image 8x8" in refused("d.zip", zip_of(files))
    files = folder()
    files["dog/gray.png"] = png(mode="L")
    assert "colour" in refused("d.zip", zip_of(files))


def test_other_formats_and_broken_files() -> None:
    assert refused("d.bin", b"hello world", status=415)
    assert "single image" in refused("d.png", png(), status=415)
    files = folder()
    files["cat/notes.txt"] = b"some notes"
    assert "PNG or JPEG" in refused("d.zip", zip_of(files))
    files = folder()
    files["cat/broken.png"] = png()[:40]
    assert "PNG or JPEG" in refused("d.zip", zip_of(files))
    assert "zip" in refused("d.npz", b"PK\x03\x04 truncated")
    assert "tar" in refused("d.tar.gz", b"\x1f\x8b\x08\x00garbage")
    assert "two class folders" in refused("d.zip", zip_of(folder(("only",))))
    assert "<class folder>/<image>" in refused("d.zip", zip_of({"a.png": png(), "b.png": png(seed=1)}))


def test_a_huge_central_directory_is_refused_before_zipfile_reads_it() -> None:
    data = bytearray(zip_of(folder()))
    end = data.rindex(b"PK\x05\x06")
    data[end + 8 : end + 12] = struct.pack("<HH", 60_000, 60_000)  # entries on this disk, in total
    assert "central directory" in refused("d.zip", bytes(data), status=413)
