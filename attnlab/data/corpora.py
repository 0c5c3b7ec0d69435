"""The embedded text corpora: documents as strings, in a fixed order, under size caps.

    stdlib  every ``.py`` file of the running interpreter's standard library (sorted relative
            paths; site-packages, dist-packages and test folders skipped), one file = one
            document. Licence: Python Software Foundation License (PSF-2.0).
    pydoc   ``pydoc_data.topics.topics``, the help-topic texts of the Python documentation
            (English prose, about 0.5 MB), sorted by topic. Licence: PSF.
    files   the user's files matched by ``data.files`` (sorted paths), read as UTF-8.

Caps: documents are taken in order until ``max_docs`` of them or ``max_bytes`` UTF-8 bytes
(the last one truncated to fit); blank documents are skipped.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
from typing import Any, Iterator

CORPORA = ("stdlib", "pydoc", "files")

LICENCES = {
    "stdlib": "Python standard library source (this interpreter's Lib/*.py): Python Software "
              "Foundation License (PSF-2.0)",
    "pydoc": "pydoc_data.topics from the Python documentation: Python Software Foundation "
             "License (PSF-2.0)",
    "files": "user-supplied files: under whatever licence their owner grants",
}

_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def _stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stdlib_files() -> list[str]:
    root = _stdlib_root()
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _SKIPPED_DIRS and not d.startswith(".")]
        found += [os.path.relpath(os.path.join(folder, n), root) for n in names if n.endswith(".py")]
    return [os.path.join(root, p) for p in sorted(found)]


def _user_files(pattern: str | None) -> list[str]:
    if not pattern:
        raise ValueError("data.corpus='files' needs data.files, a glob of text files")
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise ValueError(f"data.files={pattern!r} matches no files")
    return paths


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def _raw_documents(corpus: str, files: str | None) -> Iterator[str]:
    if corpus == "stdlib":
        yield from (_read_text(p) for p in _stdlib_files())
    elif corpus == "pydoc":
        from pydoc_data import topics
        yield from (topics.topics[name] for name in sorted(topics.topics))
    else:
        yield from (_read_text(p) for p in _user_files(files))


def iter_documents(corpus: str, *, files: str | None = None, max_docs: int = 0,
                   max_bytes: int = 0) -> Iterator[str]:
    """The corpus's non-blank documents in order, capped (0 = no cap) as the module docstring says."""
    count = size = 0
    for text in _raw_documents(corpus, files):
        if not text.strip():
            continue
        if max_bytes:
            encoded = text.encode("utf-8")
            if size + len(encoded) > max_bytes:
                text = encoded[:max_bytes - size].decode("utf-8", errors="ignore")
            size += len(text.encode("utf-8"))
        yield text
        count += 1
        if (max_docs and count >= max_docs) or (max_bytes and size >= max_bytes):
            return


def corpus_fingerprint(corpus: str, files: str | None) -> dict[str, Any]:
    """What identifies the corpus's content without reading it all (for the prepared-data cache)."""
    if corpus == "stdlib":
        return {"python": sys.version, "stdlib": _stdlib_root()}
    if corpus == "pydoc":
        return {"python": sys.version}
    listing = hashlib.sha256()
    for path in _user_files(files):
        stat = os.stat(path)
        listing.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"files": files, "listing_sha256": listing.hexdigest()}
