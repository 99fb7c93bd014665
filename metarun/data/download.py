"""Finding and downloading data files, one helper each for every data set.

:func:`find_under` looks for a data set's files in ``dataset.root`` and the subfolders it may
sit in, and :func:`not_found_message` says in one form what was looked for where and the fix.
Downloads are MD5-checked, atomic, and quick to fail offline.

Built on torchvision's downloader (:func:`torchvision.datasets.utils.download_url`, whose MD5
check is :func:`~torchvision.datasets.utils.check_integrity`). A file is written into a staging
folder inside its destination folder and moved into place with ``os.replace`` only once its
checksum matched, so an interrupted, refused or altered download leaves nothing behind.

Example:
    >>> download_file(url, root / "images_background.zip", md5="68d2efa1...")
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import tempfile
import urllib.error
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

# Offline machines must fail within this time, not hang: torchvision's downloader opens its
# connections without a timeout, so the process-wide socket default is set around it.
DOWNLOAD_TIMEOUT_S = 30.0

# What a failed download raises: URLError (no network, DNS), socket timeouts and resets (OSError),
# torchvision's RuntimeError on a checksum mismatch, a truncated HTTP response.
DOWNLOAD_ERRORS = (urllib.error.URLError, OSError, RuntimeError, http.client.HTTPException)


def root_hint(root: Path) -> str:
    """``dataset.root`` as given and as resolved, for messages."""
    return f"dataset.root={str(root)!r} (resolved: {root.resolve()})"


def find_under(root: Path, subdirs: Sequence[str], present: Callable[[Path], bool]) -> Path | None:
    """The first of ``root/sub`` for ``sub`` in ``subdirs`` (``""``: ``root`` itself) that
    holds the files, as ``present(folder)`` says; ``None`` if none does."""
    for sub in subdirs:
        folder = root / sub if sub else root
        if present(folder):
            return folder
    return None


def find_layout(
    root: Path, subdirs: Sequence[str], layouts: Sequence[tuple[str, Callable[[Path], bool]]]
) -> tuple[str, Path] | None:
    """``(kind, folder)`` of the first of ``layouts`` (``(kind, present)`` pairs, in order of
    preference) that :func:`find_under` finds; ``None`` if none is there."""
    for kind, present in layouts:
        folder = find_under(root, subdirs, present)
        if folder is not None:
            return kind, folder
    return None


def not_found_message(
    what: str, root: Path, subdirs: Sequence[str], looked_for: str, fix: str
) -> str:
    """The one form of every data set's "not found" message: what, for which ``dataset.root``,
    the files looked for, every folder looked in, and the fix."""
    looked_in = ", ".join(str(root / sub if sub else root) for sub in subdirs)
    return (
        f"{what} not found for {root_hint(root)}: looked for {looked_for} in {looked_in}. "
        f"Fix: {fix}"
    )


class DownloadError(ValueError, RuntimeError):
    """``dataset.download=true`` but a file could not be fetched (no network, a timeout, a
    checksum that does not match). The message names the file, the URLs tried and the fix.

    A ``ValueError`` like the data modules' other errors that the user fixes, so the runner
    reports it as a :class:`~metarun.config.ConfigError` (the CLI: ``error: ...``, exit status 2,
    no traceback); also a ``RuntimeError``, what the loaders raised for a failed download before
    this class existed.
    """


@contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Set the process-wide default socket timeout for the duration of the block."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


@contextmanager
def staging_dir(parent: Path) -> Iterator[Path]:
    """A temporary folder inside ``parent`` (same file system, so ``os.replace`` out of it is
    atomic), removed with whatever is left in it."""
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".download.") as tmp:
        yield Path(tmp)


def replace_into(src: Path, dest: Path) -> None:
    """Move a finished file or folder into place (readable by all, unlike temp files)."""
    os.chmod(src, 0o755 if src.is_dir() else 0o644)
    os.replace(src, dest)
    logger.info("wrote %s", dest)


def _fetch(url: str, path: Path, md5: str, timeout: float) -> str | None:
    """Download ``url`` to ``path`` with torchvision; ``None`` if it worked, else what failed."""
    # Imported here: torchvision.datasets takes about a second to import.
    from torchvision.datasets import utils as tv_utils

    try:
        with socket_timeout(timeout):
            tv_utils.download_url(url, str(path.parent), filename=path.name, md5=md5)
    except DOWNLOAD_ERRORS as error:
        # torchvision's checksum failure ("File not found or corrupted.") leaves the file there.
        if isinstance(error, RuntimeError) and path.is_file():
            if not tv_utils.check_integrity(str(path), md5):
                return (
                    f"MD5 {tv_utils.calculate_md5(str(path))}, expected {md5} (a truncated or "
                    "altered download)"
                )
        return f"{type(error).__name__}: {error}"
    return None


@contextmanager
def downloaded(
    urls: str | Sequence[str],
    filename: str,
    md5: str,
    *,
    into: Path,
    fix: str,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> Iterator[Path]:
    """Download ``filename`` from the first of ``urls`` that works into a staging folder inside
    ``into``, MD5-checked, and yield its path (e.g. to extract an archive); the staging folder
    is removed afterwards, with the file unless the block moved it out.

    Args:
        urls: one URL, or mirrors tried in turn.
        filename: the file's name.
        md5: its expected MD5 (hex).
        into: the folder it is for (created if missing).
        fix: how to get the data in place by hand, for the error message (e.g. "put the
            official x.zip at <path> yourself").
        timeout: seconds any one connection may wait for the network.

    Raises:
        DownloadError: every URL failed; the message names the file, each URL and its error.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    errors: list[str] = []
    with staging_dir(into) as tmp:
        path = tmp / filename
        for url in urls:
            logger.info("downloading %s to %s", url, into)
            problem = _fetch(url, path, md5, timeout)
            if problem is None:
                yield path
                return
            errors.append(f"{url}: {problem}")
            path.unlink(missing_ok=True)
    raise DownloadError(
        f"could not download {filename} into {into} ({'; '.join(errors)}). Fix: run again with "
        f"dataset.download=true on a machine with network access, or {fix}"
    )


def download_file(
    urls: str | Sequence[str],
    dest: Path,
    md5: str,
    *,
    where: str = "",
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> None:
    """Download one file to ``dest`` (see :func:`downloaded`): checked, then moved into place.

    Args:
        where: appended to the error message's fix, e.g. which config key names the folder.

    Raises:
        DownloadError: every URL failed.
    """
    fix = f"put the official {dest.name} (MD5 {md5}) at {dest} yourself{where}"
    with downloaded(urls, dest.name, md5, into=dest.parent, fix=fix, timeout=timeout) as path:
        replace_into(path, dest)
