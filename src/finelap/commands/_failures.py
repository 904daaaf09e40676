"""Per-file failures of the multi-file commands (classify, detect, caption, embed).

The rule: a file that cannot be used (missing, empty, corrupt, NaN/Inf samples, ...) is skipped
and reported on stderr as `finelap CMD: skipped FILE: problem`; the other files are processed
and their results printed/written. Exit status:

- 0: every file was processed;
- 1 (`EXIT_SOME_FAILED`): some files failed, the results of the others are complete;
- 2: a user error, or no file at all could be processed (a single bad input keeps the usual
  one-line error).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from ..errors import AudioError, FinelapError

EXIT_SOME_FAILED = 1


def expand_inputs(items: Sequence[str]) -> list[str]:
    """The command-line inputs with each folder replaced by the audio files under it (recursive,
    sorted, hidden entries skipped); files are kept as given, even missing ones, so that they are
    reported like any other unusable file. A folder without audio files is a user error."""
    from ..audio import AUDIO_EXTENSIONS
    from ..infer.sources import find_audio_files

    out: list[str] = []
    for item in items:
        if Path(item).is_dir():
            found = find_audio_files([item])
            if not found:
                exts = " ".join(sorted(AUDIO_EXTENSIONS))
                raise FinelapError(f"{item}: folder holds no audio files (looked recursively for {exts})")
            out.extend(str(f) for f in found)
        else:
            out.append(item)
    return out


class FileFailures:
    """Collects the files a command had to skip; see the module docstring for the rule."""

    def __init__(self, command: str, n_inputs: int) -> None:
        self.command = command
        self.n_inputs = n_inputs
        self.items: list[tuple[str, str]] = []  # (file, problem)

    def add(self, path: object, error: FinelapError | str) -> None:
        """Report one failed file on stderr. With a single input there is nothing else to do:
        the error is raised (one line, exit 2)."""
        if isinstance(error, FinelapError) and self.n_inputs == 1:
            raise error
        problem = getattr(error, "problem", None) or str(error)
        self.items.append((str(path), problem))
        print(f"finelap {self.command}: skipped {path}: {problem}", file=sys.stderr, flush=True)

    def readable(self, paths: Sequence[str]) -> list[Path]:
        """The inputs whose header can be read (checked before the model loads, so a mistyped
        name is reported at once); the others are reported and dropped."""
        from ..audio import audio_duration

        ok = []
        for p in paths:
            try:
                audio_duration(p)
            except AudioError as e:
                self.add(p, e)
                continue
            ok.append(Path(p))
        if not ok:
            raise FinelapError(f"none of the {len(paths)} input files can be read (each is listed above)")
        return ok

    @property
    def files(self) -> list[str]:
        return [f for f, _ in self.items]

    def as_json(self) -> list[dict[str, str]]:
        return [{"file": f, "error": e} for f, e in self.items]

    def exit_status(self, n_done: int) -> int:
        """0 if nothing failed; 1 (with a summary line) if some files failed; FinelapError (exit 2)
        if none was processed."""
        if not self.items:
            return 0
        if n_done == 0:
            raise FinelapError(f"none of the {self.n_inputs} input files could be processed (each is listed above)")
        print(f"finelap {self.command}: {len(self.items)} of {self.n_inputs} files failed and were skipped "
              f"(listed above); results are for the other {n_done}", file=sys.stderr, flush=True)  # fmt: skip
        return EXIT_SOME_FAILED
