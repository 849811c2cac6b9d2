"""The registry in the blob store, so that gateways and workers on several machines see the same
models, generators, detectors and data sets while sharing nothing but Redis and the store.

With ``ADVERSA_BLOB_STORE=s3`` each kind of registry entry lives under ``registry/<kind>/`` of the
bucket (``models``, ``generators``, ``datasets``; hosted models stay in ``models/hosted``, shipped
with the code)::

    <name>/<version>.claim            the version number, taken for ever (a conditional create)
    <name>/<version>/<file>           the files the card names, each with its sha256 in the card
    <name>/<version>/card.json        written last: the commit marker of the version
    <name>/<version>/detector.json    detectors calibrated later (``detectors/<team>.json``)

A version is visible once its card is in the store and until the card is deleted: a publication
that fails half-way leaves files without a card, which nobody lists. Version numbers are claimed
with a create-if-absent (``If-None-Match: *`` on S3, a hard link on the filesystem store), so two
machines publishing one name at once get different numbers, and the claim outlives a deletion,
so ``name@3`` names one thing for ever, or nothing. Published versions never change, so each
machine keeps a read-through copy (``<var>/registry-cache/<kind>/<name>/<version>/``): cards are
fetched when first read, files when a worker first loads them, checked against the card's digests
before they land; a listing drops the copies of versions whose card is gone from the store.

Torch-free: the gateway lists and reads cards through it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from models.manifest import CARD_FILE, HOSTED_DIR, NAME_RE, CardIndex, GeneratorIndex, RegistryCard
from models.store import BlobNotFoundError, BlobStore

if TYPE_CHECKING:
    from models.datasets import DatasetIndex
    from workers.settings import CommonSettings

CLAIM_SUFFIX = ".claim"
CACHE_DIR = "registry-cache"
KINDS = ("models", "generators", "datasets")
MAX_TRIES = 100

CardT = TypeVar("CardT", bound=RegistryCard)


class RegistryPublishError(RuntimeError):
    """A registry entry could not be written to the store."""


class StoredFileError(OSError):
    """A file of a published version is missing from the store or differs from its card's digest."""


class StoreRegistry:
    """One kind of registry (``models``, ``generators``, ``datasets``) in ``store``, with this
    machine's read-through copy under ``cache``."""

    def __init__(self, store: BlobStore, kind: str, cache: Path) -> None:
        if kind not in KINDS:
            raise ValueError(f"expected a registry kind of {KINDS}, got {kind!r}")
        self.store = store
        self.prefix = f"registry/{kind}"
        self.cache = cache

    def _key(self, name: str, *parts: str) -> str:
        return "/".join((self.prefix, name, *parts))

    def _relative(self, keys: Iterable[str]) -> Iterable[list[str]]:
        start = len(self.prefix) + 1
        return (key[start:].split("/") for key in keys)

    # --- reading ---

    def _listed(self, name: str | None) -> dict[str, set[int]]:
        """Name -> versions whose card is in the store (one listing), pruning this machine's copies
        of versions that are gone."""
        folder = self.prefix if name is None else self._key(name)
        found: dict[str, set[int]] = {}
        for parts in self._relative(self.store.list(folder)):
            if len(parts) == 3 and parts[2] == CARD_FILE and parts[1].isdigit():
                found.setdefault(parts[0], set()).add(int(parts[1]))
        self._prune(found, name)
        return found

    def _prune(self, live: dict[str, set[int]], name: str | None) -> None:
        """Drop this machine's copies of versions the listing did not show (deleted ones; a copy of
        a version published while the listing ran is fetched again when next used)."""
        if not self.cache.is_dir():
            return
        names = [self.cache / name] if name is not None else list(self.cache.iterdir())
        for base in names:
            if not base.is_dir():
                continue
            for child in base.iterdir():
                if child.name.isdigit() and int(child.name) not in live.get(base.name, set()):
                    shutil.rmtree(child, ignore_errors=True)

    def names(self) -> list[str]:
        return sorted(self._listed(None))

    def versions(self, name: str) -> list[int]:
        if not NAME_RE.match(name):
            return []
        return sorted(self._listed(name).get(name, set()))

    def claimed(self, name: str) -> set[int]:
        """Every number ever given to ``name``: claims and published versions."""
        used: set[int] = set()
        for parts in self._relative(self.store.list(self._key(name))):
            if len(parts) == 2 and parts[1].endswith(CLAIM_SUFFIX) and parts[1][: -len(CLAIM_SUFFIX)].isdigit():
                used.add(int(parts[1][: -len(CLAIM_SUFFIX)]))
            elif len(parts) == 3 and parts[2] == CARD_FILE and parts[1].isdigit():
                used.add(int(parts[1]))
        return used

    def card_file(self, name: str, version: int) -> Path | None:
        """This machine's copy of the card of ``name@version`` (fetched on first use); None when the
        store has none. The caller has listed the version: the copy is the store's card."""
        path = self.cache / name / str(version) / CARD_FILE
        if path.is_file():
            return path
        try:
            data = self.store.get(self._key(name, str(version), CARD_FILE))
        except BlobNotFoundError:
            return None
        _write_atomic(path, data)
        return path

    def fetch(self, name: str, version: int, files: Mapping[str, str]) -> Path:
        """The local directory of ``name@version`` with ``files`` (file name -> sha256) in it: each
        one missing is read from the store and checked against its digest before it lands."""
        directory = self.cache / name / str(version)
        for file, digest in files.items():
            if (directory / file).is_file():
                continue
            try:
                data = self.store.get(self._key(name, str(version), file))
            except BlobNotFoundError:
                raise StoredFileError(f"{name}@{version}: {file} is not in the store") from None
            found = hashlib.sha256(data).hexdigest()
            if found != digest:
                raise StoredFileError(f"{name}@{version}: {file} in the store has sha256 {found}, "
                                      f"expected {digest} (the card's)")
            _write_atomic(directory / file, data)
        return directory

    def sizes(self) -> dict[tuple[str, int], int]:
        """(name, version) -> bytes of the version's own files (card included, later detectors
        not), for every version whose card is in the store."""
        sizes: dict[tuple[str, int], int] = {}
        carded: set[tuple[str, int]] = set()
        start = len(self.prefix) + 1
        for info in self.store.scan(self.prefix):
            parts = info.key[start:].split("/")
            if len(parts) == 3 and parts[1].isdigit():
                key = (parts[0], int(parts[1]))
                sizes[key] = sizes.get(key, 0) + info.size
                if parts[2] == CARD_FILE:
                    carded.add(key)
        return {key: size for key, size in sizes.items() if key in carded}

    def read_extra(self, name: str, version: int, path: str) -> bytes | None:
        """A file added to a version after it was published (a detector); None when there is none.
        Read from the store every time: a recalibration replaces it."""
        try:
            return self.store.get(self._key(name, str(version), path))
        except BlobNotFoundError:
            return None

    def write_extra(self, name: str, version: int, path: str, data: bytes) -> None:
        self.store.put(self._key(name, str(version), path), data)

    # --- writing ---

    def publish(self, card: CardT, files: Mapping[str, bytes], taken: Iterable[int] = ()) -> CardT:
        """Add ``card`` and ``files`` (file name -> bytes) as the next free version of ``card.name``;
        returns the card with that version. ``taken`` lists versions used elsewhere (hosted
        models). The number is claimed first, then the files go up, then the card, last; when
        anything fails on the way the version's files are removed again (its number stays used)."""
        if CARD_FILE in files or any("/" in file or file.startswith(".") for file in files):
            raise RegistryPublishError(f"{card.name}: expected plain file names other than {CARD_FILE}, "
                                       f"got {sorted(files)}")
        version = max(set(taken) | self.claimed(card.name), default=0) + 1
        claim = json.dumps({"claimed": datetime.now(UTC).isoformat(timespec="seconds"),
                            "by": f"{socket.gethostname()}:{os.getpid()}"}).encode()
        for _ in range(MAX_TRIES):
            if self.store.create(self._key(card.name, f"{version}{CLAIM_SUFFIX}"), claim):
                break
            version += 1
        else:
            raise RegistryPublishError(f"{card.name}: no free version after {MAX_TRIES} tries")
        card = card.model_copy(update={"version": version})
        body = (card.model_dump_json(indent=2) + "\n").encode()
        try:
            for file, data in files.items():
                self.store.put(self._key(card.name, str(version), file), data)
            self.store.put(self._key(card.name, str(version), CARD_FILE), body)
        except BaseException:
            with suppress(Exception):  # the store may be what failed; nothing lists a card-less version
                self.store.delete_prefix(self._key(card.name, str(version)))
            raise
        with suppress(OSError):  # this machine's copy: the next job here needs no download
            directory = self.cache / card.name / str(version)
            for file, data in files.items():
                _write_atomic(directory / file, data)
            _write_atomic(directory / CARD_FILE, body)
        return card

    def unpublish(self, name: str, version: int) -> bool:
        """Delete ``name@version``: its card first (the version disappears from every machine's
        listing at once), then its files and this machine's copy. Its claim stays, so the number
        is never given to something else. False when there is no such version."""
        if not NAME_RE.match(name) or version < 1:
            return False
        card = self._key(name, str(version), CARD_FILE)
        if not self.store.exists(card):
            return False
        self.store.delete(card)
        self.store.delete_prefix(self._key(name, str(version)))
        shutil.rmtree(self.cache / name / str(version), ignore_errors=True)
        return True


def sweep_unpublished(store: BlobStore, grace_s: float, now: float | None = None) -> list[str]:
    """Delete what publications cut short left in the store (a killed worker cannot clean up): the
    files of a claimed version that has no card and nothing newer than ``grace_s`` (a publication
    still uploading keeps its files). The claim stays, so the number stays used; a version folder
    without a claim (a team's detector of a hosted model) is never touched. The keys deleted."""
    cutoff = (time.time() if now is None else now) - grace_s
    folders: dict[tuple[str, str, str], list[str]] = {}
    newest: dict[tuple[str, str, str], float] = {}
    claimed: set[tuple[str, str, str]] = set()
    carded: set[tuple[str, str, str]] = set()
    for info in store.scan("registry"):
        parts = info.key.split("/")
        if len(parts) == 4 and parts[3].endswith(CLAIM_SUFFIX):
            claimed.add((parts[1], parts[2], parts[3][: -len(CLAIM_SUFFIX)]))
        elif len(parts) >= 5 and parts[3].isdigit():
            folder = (parts[1], parts[2], parts[3])
            folders.setdefault(folder, []).append(info.key)
            newest[folder] = max(newest.get(folder, 0.0), info.modified)
            if len(parts) == 5 and parts[4] == CARD_FILE:
                carded.add(folder)
    deleted: list[str] = []
    for folder, keys in sorted(folders.items()):
        if folder in claimed and folder not in carded and newest[folder] < cutoff:
            for key in keys:
                store.delete(key)
            deleted += sorted(keys)
    return deleted


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Registries:
    """The three registries of one process, as the settings place them."""

    models: CardIndex
    generators: GeneratorIndex
    datasets: DatasetIndex


def open_registries(settings: CommonSettings, store: BlobStore) -> Registries:
    """``file`` store: the registries under the var dir (``models``, ``generators``, ``datasets``),
    as on one machine. ``s3``: in the store, with this machine's copy under
    ``<var>/registry-cache``; hosted models from the code either way."""
    from models.datasets import DatasetIndex

    if settings.blob_store != "s3":
        return Registries(CardIndex.default([settings.models_root]), GeneratorIndex([settings.generators_root]),
                          DatasetIndex([settings.datasets_root]))
    cache = settings.var_dir / CACHE_DIR
    mirrors = {kind: StoreRegistry(store, kind, cache / kind) for kind in KINDS}
    return Registries(CardIndex([HOSTED_DIR, cache / "models"], mirrors["models"]),
                      GeneratorIndex([cache / "generators"], mirrors["generators"]),
                      DatasetIndex([cache / "datasets"], mirrors["datasets"]))
