"""Small shared helpers: progress bars, atomic writes, logging to stderr."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", disable: bool | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar on stderr. Disabled when stderr is not a terminal
    (CI logs, pipes) or FINELAP_NO_PROGRESS=1, so logs stay readable."""
    if disable is None:
        disable = not sys.stderr.isatty() or os.environ.get("FINELAP_NO_PROGRESS") == "1"
    if disable:
        yield from iterable
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.console import Console

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(desc, total=total)
        for item in iterable:
            yield item
            bar.advance(task)


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def public_mode(path: str | Path, directory: bool = False) -> None:
    """Give a temp file (mkstemp: 0600) or dir (mkdtemp: 0700) the mode a plain open()/mkdir()
    would have, so outputs renamed into place are readable by the user's group as usual."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def log(msg: str) -> None:
    """Human-facing status line on stderr (stdout is kept for machine-readable output)."""
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def atomic_path(path: str | Path, mode_suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed over `path`,
    so readers never see a half-written file and a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + mode_suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        public_mode(tmp_path)
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
