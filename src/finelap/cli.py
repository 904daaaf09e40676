"""`finelap` console script: one subcommand per job.

Each subcommand lives in `finelap.commands.<name>` and exposes `add_arguments(parser)` and
`run(args) -> int`. Command modules keep heavy imports inside `run`, so `--help` is fast.
User errors (FinelapError and friends) print one line and exit 2; no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path
from typing import Any

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("finelap.commands.synth", "mix labelled single-event clips into strong-label soundscapes"),
    "corpus": ("finelap.commands.corpus", "build the built-in default sound pool (fluidsynth + espeak-ng)"),
    "train": ("finelap.commands.train", "train a model from a YAML config or preset, with dotted overrides"),
    "calibrate": ("finelap.commands.calibrate", "choose detection thresholds/median filter on validation data; stored in the checkpoint"),
    "embed": ("finelap.commands.embed", "embed audio files or folders (clip and optional frame embeddings)"),
    "classify": ("finelap.commands.classify", "zero-shot classification of audio files against your labels"),
    "detect": ("finelap.commands.detect", "sound event detection: when each label happens (DCASE TSV, plots)"),
    "ground": ("finelap.commands.ground", "find where a phrase happens in an audio file"),
    "eval": ("finelap.commands.eval", "evaluate a checkpoint: retrieval, zeroshot, sed or grounding (JSON + Markdown + PNGs)"),
    "index": ("finelap.commands.index", "build, update or inspect a text-searchable index over a folder of audio"),
    "search": ("finelap.commands.search", "search an index with words: ranked files with their best time span"),
    "caption": ("finelap.commands.caption", "describe audio files in words (checkpoints with a caption decoder, preset slap)"),
    "import": ("finelap.commands.import_", "convert a downloaded published checkpoint (LAION-CLAP, ...) into a finelap checkpoint"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The command's docstring as written (its examples keep their lines), and each flag's
    default printed once: appended as "(default: X)" unless the help text already says what the
    default is, or there is nothing to say (None, False, a flag without a value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if "default" in help_ or "%(default)" in help_:
            return help_
        if action.default in (None, False, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
            return help_
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return help_ + " (default: %(default)s)"
        return help_


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="finelap", description="Fine-grained language-audio pretraining.",
                                     epilog="`finelap COMMAND --help` shows a command's options and examples.")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"finelap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        mod = importlib.import_module(module)
        # the whole module docstring: what the command does, its examples and its output
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip(), formatter_class=HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _one_line_warnings(command: str, default: Any) -> Any:
    """finelap's own warnings as one line (`finelap detect: warning: ...`); others unchanged."""
    package_dir = str(Path(__file__).resolve().parent)

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 (warnings API)
        if str(Path(filename).resolve()).startswith(package_dir) or "/finelap/" in str(filename):
            print(f"finelap {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    from .errors import FinelapError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    mod = importlib.import_module(args._module)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(args.command, warnings.showwarning)
            return int(mod.run(args) or 0)
    except FinelapError as e:
        print(f"finelap {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"finelap {args.command}: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"finelap {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and friends
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
