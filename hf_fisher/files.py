"""Writing output folders so that a crash or a bad argument never leaves a half-written one behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _default_mode() -> int:
    """The mode a plain ``mkdir`` would give a folder (0o777 minus the umask); mkdtemp's is private (0o700)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


@contextmanager
def staged_folder(target: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh hidden folder next to ``target``; when the block ends without error it becomes ``target``.

    The rename is atomic on one file system, so readers see either no ``target`` or a complete one. On error the
    staging folder is removed and ``target`` is left as it was. An existing ``target`` is replaced only with
    ``replace=True`` (after the new folder is complete); otherwise ``FileExistsError`` is raised at the end — also
    when another process created ``target`` meanwhile. Single-process writers only (the name is random).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        os.chmod(staging, _default_mode())
        if target.exists():
            if not replace:
                raise FileExistsError(f"{target} exists already; nothing was overwritten")
            shutil.rmtree(target)
        try:
            os.rename(staging, target)
        except OSError as err:
            if target.exists():
                raise FileExistsError(f"{target} exists already; nothing was overwritten") from err
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
