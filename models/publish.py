"""Publishing into a registry root, and deleting from it, without torch (the gateway deletes).

A registry root is laid out as ``<root>/<name>/<version>/`` with ``card.json`` and the files it
names. Publishing writes everything into a staging directory that is then renamed to the next
free version in one step, so a worker killed half-way leaves no visible entry (only a staging
directory that the index ignores), and two jobs publishing the same name at once get different
versions. Deleting hides the version in one rename and leaves a tombstone, so that a version
number is never given to something else: ``name@3`` names one thing for ever, or nothing.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TypeVar

from models.manifest import CARD_FILE, NAME_RE, RegistryCard

TOMBSTONE_SUFFIX = ".deleted"
MAX_TRIES = 100

CardT = TypeVar("CardT", bound=RegistryCard)


class PublishError(RuntimeError):
    """A registry entry could not be written."""


def used_versions(base: Path) -> set[int]:
    """Version numbers under ``<root>/<name>``, present or deleted."""
    if not base.is_dir():
        return set()
    used = set()
    for path in base.iterdir():
        stem = path.name.removesuffix(TOMBSTONE_SUFFIX)
        if stem.isdigit():
            used.add(int(stem))
    return used


def publish_files(root: Path, card: CardT, files: Mapping[str, bytes], taken: Iterable[int] = ()) -> CardT:
    """Add ``card`` and ``files`` (file name -> bytes) under ``root`` as the next free version of
    ``card.name``; returns the card with that version. ``taken`` lists versions used under other
    roots (hosted models). The caller checks the files against the card's digests first."""
    if CARD_FILE in files or any("/" in name or name.startswith(".") for name in files):
        raise PublishError(f"{card.name}: expected plain file names other than {CARD_FILE}, "
                           f"got {sorted(files)}")
    base = root / card.name
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=base))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the published entry from other users
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        version = max(set(taken) | used_versions(base), default=0) + 1
        for _ in range(MAX_TRIES):
            card = card.model_copy(update={"version": version})
            card.write(staging / CARD_FILE)
            try:
                os.rename(staging, base / str(version))
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                version += 1
                continue
            return card
        raise PublishError(f"{card.name}: no free version after {MAX_TRIES} tries")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def unpublish(root: Path, name: str, version: int) -> bool:
    """Delete ``name@version`` from ``root``; False when it is not there (or already deleted).

    The tombstone is written before the directory disappears, so a concurrent ``publish_files``
    sees the number as used either way. The rename hides the entry from the index at once; the
    files are removed afterwards (a reader that had opened one keeps its handle on Linux).
    """
    if not NAME_RE.match(name) or version < 1:
        return False
    base = root / name
    directory = base / str(version)
    if not (directory / CARD_FILE).is_file():
        return False
    (base / f"{version}{TOMBSTONE_SUFFIX}").touch()
    trash = base / f".trash-{version}-{secrets.token_hex(4)}"
    try:
        os.rename(directory, trash)
    except FileNotFoundError:  # another request deleted it first
        return False
    shutil.rmtree(trash, ignore_errors=True)
    return True
