"""Downloads and archives: mirrors tried in turn, md5 and SHA-256 checks, safe tar extraction."""

from __future__ import annotations

import hashlib
import http.client
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from .dataset import DataError


def _fetch(url: str, dest: Path) -> None:
    """Copy `url` to `dest`: reslab's only network access (tests replace it)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(urls: list[str], dest: Path, md5: str) -> None:
    """Try each mirror; only a file whose md5 matches is moved into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    errors = []
    for url in urls:
        try:
            _fetch(url, part)
        except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts
            errors.append(f"{url}: {e}")
            continue
        got = _md5(part)
        if got == md5:
            part.replace(dest)
            return
        errors.append(f"{url}: md5 {got}, expected {md5} (corrupted or incomplete download)")
    part.unlink(missing_ok=True)
    raise DataError(
        f"could not download {dest.name}:\n  " + "\n  ".join(errors)
        + f"\nCheck the network, or put the file in {dest.parent} yourself."
    )


def safe_extract(archive: Path, dest: Path, folders: tuple[str, ...]) -> None:
    """Extract `folders` from a tar after refusing links, devices, absolute paths and `..`."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                if not (m.isfile() or m.isdir()) or m.name.startswith("/") or (
                    ".." in PurePosixPath(m.name).parts
                ):
                    raise DataError(f"{archive} holds an unsafe member {m.name!r} (a link, device, "
                                    "absolute path or '..'); refusing it: use the official archive")
            tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
            try:
                # The stdlib "data" filter is a second guard where this Python has it.
                guard = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **guard)
                for folder in folders:
                    if not (tmp / folder).is_dir():
                        raise DataError(f"{archive} has no {folder}/ folder; use the official "
                                        "archive")
                for folder in folders:  # all checked first: a bad archive leaves nothing behind
                    (tmp / folder).replace(dest / folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot extract {archive}: {e}; delete it (and what it left in {dest}) "
                        "and download again") from e
