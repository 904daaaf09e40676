"""Self-describing, atomic checkpoints (DESIGN principle 8). No pickle anywhere.

A checkpoint is a directory::

    step-00001000/
      model.safetensors       weights (tied/shared tensors stored once, re-tied on load)
      config.json             format_version, finelap_version, step, preset, name,
                              preprocessing {sample_rate, mel params, clip/max seconds, frame_rate_hz,
                              prompt_template, ...}, config {the resolved RunConfig}
      ema.safetensors         optional EMA weights
      optimizer.safetensors   optional: every tensor of the training state (optimizer moments,
                              scheduler/scaler tensors, RNG states)
      trainer_state.json      optional: the non-tensor rest of that state, with references into
                              optimizer.safetensors, plus the trainer's own JSON-able extras
      <name>.json             optional extra JSON files (e.g. phrase_bank.json)

Evaluation and inference need only model.safetensors + config.json. Writing goes to a hidden temp
directory next to the target which is renamed into place, so a crash (or Ctrl-C) mid-save leaves the
previous checkpoint intact. A run directory holds `step-XXXXXXXX/` checkpoints and a `LATEST` file
naming the newest one.

This module is file I/O only and sits below models/ and train/ (models.build and infer load
through it); restoring an optimizer/scheduler from a loaded checkpoint is in finelap.train.checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from .errors import CheckpointError
from .utils import public_mode

FORMAT_VERSION = 1

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIM_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
LATEST_FILE = "LATEST"
_RESERVED_JSON = {"config", "trainer_state"}
_STEP_DIR = re.compile(r"^step-(\d+)$")
_ALIASES_KEY = "finelap.aliases"
_KEYS_KEY = "finelap.keys"

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "capture_rng",
    "checkpoint_name",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng",
    "rotate_checkpoints",
    "save_checkpoint",
    "sweep_stale",
]


# ----------------------------------------------------------------------------- small IO helpers


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:  # directory fsync makes the renames durable on POSIX; not available everywhere (Windows)
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    # sorted keys: the same content gives the same bytes whichever code path built the dict (the
    # search index identifies a model by its checkpoint files' hashes)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _fsync_file(path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt JSON (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: corrupt JSON (not UTF-8 text)") from None


def _state_of(obj: Any) -> Any:
    """Accept either an object with state_dict() (module, optimizer, scheduler, scaler) or its state."""
    return obj.state_dict() if hasattr(obj, "state_dict") and callable(obj.state_dict) else obj


# ----------------------------------------------------------------------------- tensors <-> safetensors


def _save_tensors(state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    """Save a flat name->tensor dict. safetensors refuses tensors that share memory (tied weights,
    views): identical views are stored once and recorded as aliases; partial overlaps are cloned."""
    from safetensors.torch import save_file

    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, t in state.items():
        if not isinstance(name, str):
            raise TypeError(f"{what}: key {name!r} is not a string")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{name!r}] is a {type(t).__name__}, not a tensor; put non-tensor state in trainer_state")
        t = t.detach()
        if t.numel() > 0:
            st = t.untyped_storage()
            sid = (t.device, st.data_ptr())
            vkey = (sid, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if vkey in views:
                aliases[name] = views[vkey]
                continue
            views[vkey] = name
            if sid in storages or not t.is_contiguous() or t.numel() * t.element_size() != st.nbytes():
                t = t.clone(memory_format=torch.contiguous_format)
            storages.add(sid)
        out[name] = t.cpu()
    meta = {"format": "pt", _ALIASES_KEY: json.dumps(aliases), _KEYS_KEY: json.dumps(list(state.keys()))}
    save_file(out, str(path), metadata=meta)
    _canonical_header(path)
    _fsync_file(path)


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors header with its `__metadata__` keys sorted and its tensors in data order.

    The library keeps metadata in a Rust HashMap, whose order changes from one save to the next
    (5 different byte strings in 10 saves of the same tensors), so identical weights hashed
    differently. The header is 8 bytes of little-endian length, then JSON padded with spaces to a
    multiple of 8; the tensor data after it is untouched (offsets are relative to its start)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None)
        canon: dict[str, Any] = {} if meta is None else {"__metadata__": dict(sorted(meta.items()))}
        for name in sorted(header, key=lambda k: (header[k]["data_offsets"][0], header[k]["data_offsets"][1], k)):
            canon[name] = header[name]
        text = json.dumps(canon, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-len(text) % 8)
        if len(text) == n:  # the usual case: same content, same length; patch in place
            f.seek(8)
            f.write(text)
            return
    # a different length (the library escaped something differently): copy the data behind a new header
    tmp = path.with_name(path.name + ".canon")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        src.seek(8 + n)
        dst.write(len(text).to_bytes(8, "little") + text)
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, path)


def _load_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        aliases = json.loads(meta.get(_ALIASES_KEY, "{}"))
        order = json.loads(meta.get(_KEYS_KEY, "null")) or list(tensors)
    except CheckpointError:
        raise
    except Exception as e:  # SafetensorError, header JSON errors, truncated files
        raise CheckpointError(f"{path}: corrupt safetensors file ({type(e).__name__}: {e})") from None
    for alias, target in aliases.items():
        if target not in tensors:
            raise CheckpointError(f"{path}: corrupt safetensors file (alias {alias!r} -> missing {target!r})")
        tensors[alias] = tensors[target]  # same tensor object: ties survive the round trip
    missing = [k for k in order if k not in tensors]
    if missing:
        raise CheckpointError(f"{path}: corrupt safetensors file (missing tensor {missing[0]!r})")
    return {k: tensors[k] for k in order}


# ----------------------------------------------------------------------------- nested state <-> JSON + tensors


class _Packer:
    """Turns nested optimizer/scheduler/RNG state into JSON with tensors split out by name."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _name(self, path: str) -> str:
        name, i = path, 1
        while name in self.tensors:
            name, i = f"{path}#{i}", i + 1
        return name

    def pack(self, obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            name = self._name(path)
            self.tensors[name] = obj.detach()
            return {"__tensor__": name}
        if isinstance(obj, np.ndarray):
            # raw bytes + dtype + shape: exact for every dtype, including uint32 (numpy's MT19937 key)
            name = self._name(path)
            arr = np.ascontiguousarray(obj)
            self.tensors[name] = torch.from_numpy(arr.reshape(-1).view(np.uint8).copy())
            return {"__ndarray__": name, "dtype": arr.dtype.str, "shape": list(arr.shape)}
        if isinstance(obj, np.generic):
            return self.pack(obj.item(), path)
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, tuple):
            return {"__tuple__": [self.pack(v, f"{path}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.pack(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if isinstance(obj, Mapping):
            plain = all(isinstance(k, str) and not (k.startswith("__") and k.endswith("__")) for k in obj)
            if plain:
                return {k: self.pack(v, f"{path}.{k}") for k, v in obj.items()}
            # non-string keys (optimizer state is keyed by int param ids) keep their type
            return {"__items__": [[self.pack(k, f"{path}.key{i}"), self.pack(v, f"{path}.{k}")]
                                  for i, (k, v) in enumerate(obj.items())]}
        raise TypeError(
            f"cannot store {type(obj).__name__} at '{path}' in a checkpoint "
            "(allowed: tensors, numpy arrays, numbers, strings, None, lists, tuples, dicts)"
        )


def _unpack(obj: Any, tensors: Mapping[str, torch.Tensor], where: Path) -> Any:
    if isinstance(obj, list):
        return [_unpack(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj or "__ndarray__" in obj:
        name = obj.get("__tensor__", obj.get("__ndarray__"))
        if name not in tensors:
            if not (where.parent / OPTIM_FILE).is_file():
                raise CheckpointError(
                    f"{where.parent}: incomplete checkpoint: {OPTIM_FILE} is missing "
                    f"(load with training_state=False to use the weights only)"
                )
            raise CheckpointError(f"{where}: refers to tensor {name!r} which {OPTIM_FILE} does not contain")
        t = tensors[name]
        if "__tensor__" in obj:
            return t
        return np.frombuffer(t.numpy().tobytes(), dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
    if "__tuple__" in obj:
        return tuple(_unpack(v, tensors, where) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_unpack(k, tensors, where): _unpack(v, tensors, where) for k, v in obj["__items__"]}
    return {k: _unpack(v, tensors, where) for k, v in obj.items()}


# ----------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """Global RNG states: python `random`, numpy's legacy global generator, torch CPU (and CUDA
    when initialised). Generators the trainer owns itself belong in `trainer_state`."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any] | None) -> None:
    """Inverse of `capture_rng` (e.g. `restore_rng(ckpt.rng_state)`)."""
    if state is None:
        raise CheckpointError("checkpoint has no RNG state (it was saved with rng=False)")
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        np.random.set_state(tuple(state["numpy"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to("cpu", torch.uint8) for s in state["cuda"]])


# ----------------------------------------------------------------------------- atomic directory


def _siblings(path: Path, kind: str) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.{kind}-*")) if path.parent.is_dir() else []


# Temp and backup directories are named `.<target>.<tmp|old>-<host>-<pid>-<random>`, so a later
# process can prove a leftover is ours (the pattern) and stale (made on this host by a process that
# no longer exists). Names without the owner part (older finelap) are only swept when provably useless.
_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-(?:(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-)?[A-Za-z0-9_]+$")


def _host_tag() -> str:
    return hashlib.blake2b(socket.gethostname().encode("utf-8", "replace"), digest_size=4).hexdigest()


def _owned_prefix(name: str, kind: str) -> str:
    return f".{name}.{kind}-{_host_tag()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's), or cannot tell: keep
    return True


def sweep_stale(run_dir: str | Path) -> list[Path]:
    """Clean what killed saves left in `run_dir`; returns the leftovers removed or restored.

    A leftover counts as stale only when it carries this host's tag and the pid of a process that
    has exited (a live save, here or on another host sharing the folder, is never touched), or when
    it is a backup whose checkpoint is complete again (the save that made it finished). A stale
    backup whose checkpoint is missing is the complete previous checkpoint: it is renamed back.
    Called by every save; safe to call at any time.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    done: list[Path] = []
    for p in sorted(run_dir.iterdir()):
        m = _LEFTOVER.match(p.name)
        if m is None or p.is_symlink() or not p.is_dir():
            continue
        target = run_dir / m["target"]
        finished = m["kind"] == "old" and (target / CONFIG_FILE).is_file()
        dead = m["host"] == _host_tag() and m["pid"] is not None and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"]))
        if not (finished or dead):
            continue
        if m["kind"] == "old" and not target.exists() and (p / CONFIG_FILE).is_file():
            os.rename(p, target)  # the save died between its two renames
        else:
            _remove_dir(p)
        done.append(p)
    return done


def _remove_dir(p: Path) -> None:
    """Delete a checkpoint directory, config.json first: if the deletion is interrupted, what is left
    no longer looks like a complete checkpoint."""
    (p / CONFIG_FILE).unlink(missing_ok=True)
    shutil.rmtree(p, ignore_errors=True)


def _recover(path: Path) -> None:
    """Undo an interrupted save: a crash between "old -> backup" and "new -> path" leaves only the
    backup, which is a complete checkpoint; put it back. Half-written temp dirs are removed."""
    if not path.exists():
        backups = [b for b in _siblings(path, "old") if (b / CONFIG_FILE).is_file()]
        if backups:
            os.rename(backups[-1], path)
    for stale in _siblings(path, "tmp") + _siblings(path, "old") + _siblings(path, "rm"):
        _remove_dir(stale)


@contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent)  # other names' leftovers (step-N names are never saved twice)
    _recover(path)
    tmp = Path(tempfile.mkdtemp(prefix=_owned_prefix(path.name, "tmp"), dir=path.parent))
    try:
        public_mode(tmp, directory=True)
        yield tmp
        for f in tmp.iterdir():  # safetensors writes through its own 0600 temp files
            public_mode(f, directory=f.is_dir())
        _fsync_dir(tmp)
        if path.exists():
            backup = Path(tempfile.mkdtemp(prefix=_owned_prefix(path.name, "old"), dir=path.parent))
            os.rmdir(backup)  # we only wanted a unique name
            os.rename(path, backup)
            os.rename(tmp, path)
            _remove_dir(backup)
        else:
            os.rename(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- save


def checkpoint_name(step: int) -> str:
    """Directory name for a step checkpoint: step-00001000 (sorts by step)."""
    return f"step-{int(step):08d}"


def _preprocessing(cfg: Mapping[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """What inference needs to reproduce the input pipeline, pulled out of the run config so it can
    be read without knowing the config schema."""
    out: dict[str, Any] = {}
    audio = cfg.get("audio") if isinstance(cfg.get("audio"), Mapping) else {}
    for k in ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels", "fmin", "fmax", "clip_seconds", "max_seconds"):
        if k in audio:
            out[k] = audio[k]
    ev = cfg.get("eval") if isinstance(cfg.get("eval"), Mapping) else {}
    if "prompt_template" in ev:
        out["prompt_template"] = ev["prompt_template"]
    data = cfg.get("data") if isinstance(cfg.get("data"), Mapping) else {}
    if "caption_template" in data:
        out["caption_template"] = data["caption_template"]
    out.update(extra or {})
    return out


def save_checkpoint(
    path: str | Path,
    model_state: Mapping[str, torch.Tensor] | torch.nn.Module,
    config: Any,
    *,
    step: int,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    ema_state: Mapping[str, torch.Tensor] | torch.nn.Module | None = None,
    trainer_state: Mapping[str, Any] | None = None,
    extra_json: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    rng: bool = True,
    update_latest: bool = True,
) -> Path:
    """Write a checkpoint directory atomically and return its path.

    model_state / ema_state: state dicts (or modules). config: the resolved RunConfig (dataclass or
    dict). optimizer / scheduler / scaler: objects with state_dict() or their state dicts.
    trainer_state: the trainer's own JSON-able state (tensors allowed), e.g. EMA update count, best
    metric. extra_json: name -> JSON-able object, written as `<name>.json` (e.g. "phrase_bank").
    preprocessing: facts only the model knows, merged into config.json's `preprocessing`
    (at least {"frame_rate_hz": ...}). rng: also store python/numpy/torch RNG states.
    update_latest: write `LATEST` in the parent directory naming this checkpoint.
    Only one process (rank 0) may save to a given path.
    """
    from ._version import __version__
    from .config import to_dict

    path = Path(path)
    cfg = to_dict(config)
    if not isinstance(cfg, dict):
        raise TypeError(f"config must be a dataclass or a dict, got {type(config).__name__}")
    extra_json = dict(extra_json or {})
    for name in list(extra_json):
        stem = name[:-5] if name.endswith(".json") else name
        if not re.match(r"^[A-Za-z0-9_.\-]+$", stem) or stem in _RESERVED_JSON:
            raise ValueError(f"extra_json name {name!r} must be a plain file stem and not one of {sorted(_RESERVED_JSON)}")
        extra_json[stem] = extra_json.pop(name)
    meta = {
        "format_version": FORMAT_VERSION,
        "finelap_version": __version__,
        "step": int(step),
        # no creation time: identical weights and config must give identical files
        "preset": cfg.get("preset"),
        "name": cfg.get("name"),
        "preprocessing": _preprocessing(cfg, preprocessing),
        "config": cfg,
    }
    with_training = any(x is not None for x in (optimizer, scheduler, scaler, trainer_state)) or rng
    if with_training:
        packer = _Packer()
        tstate = {
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "optimizer": packer.pack(_state_of(optimizer), "optimizer"),
            "scheduler": packer.pack(_state_of(scheduler), "scheduler"),
            "scaler": packer.pack(_state_of(scaler), "scaler"),
            "rng": packer.pack(capture_rng(), "rng") if rng else None,
            "trainer": packer.pack(dict(trainer_state) if trainer_state is not None else None, "trainer"),
        }

    with _atomic_dir(path) as tmp:
        _save_tensors(_state_of(model_state), tmp / MODEL_FILE, "model_state")
        if ema_state is not None:
            _save_tensors(_state_of(ema_state), tmp / EMA_FILE, "ema_state")
        if with_training:
            _save_tensors(packer.tensors, tmp / OPTIM_FILE, "training state")
            _write_json(tmp / TRAINER_FILE, tstate)
        for stem, obj in extra_json.items():
            _write_json(tmp / f"{stem}.json", obj)
        _write_json(tmp / CONFIG_FILE, meta)  # last: a directory with config.json is complete

    if update_latest:
        from .utils import write_text_atomic

        write_text_atomic(path.parent / LATEST_FILE, path.name + "\n")
    return path


# ----------------------------------------------------------------------------- load


@dataclass
class Checkpoint:
    """A loaded checkpoint. `config` is the resolved RunConfig as a dict (pass it to
    `finelap.config.resolve_run_config`); `meta` is all of config.json."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    meta: dict[str, Any]
    step: int
    ema_state: dict[str, torch.Tensor] | None = None
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    scaler_state: dict[str, Any] | None = None
    rng_state: dict[str, Any] | None = None
    trainer_state: dict[str, Any] | None = None  # the trainer's own extras, as saved
    extra: dict[str, Any] = field(default_factory=dict)  # <name>.json files by name

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.meta.get("preprocessing", {})


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete `step-*` checkpoint directories in `run_dir`, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / CONFIG_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint named by `run_dir/LATEST`, else the highest-step one; None if there is none.

    LATEST must name a folder directly inside `run_dir`: a name that leads anywhere else ('..',
    a path, an absolute path, a symlink out of the run directory) raises CheckpointError rather than
    loading whatever lies there. A name that no longer exists falls back to the highest step."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST_FILE
    if pointer.is_file():
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise CheckpointError(f"{pointer}: corrupt LATEST file (not UTF-8 text)") from None
        if name:
            outside = (
                name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or os.path.isabs(name)
                or ((run_dir / name).exists() and (run_dir / name).resolve().parent != run_dir.resolve())
            )  # fmt: skip
            if outside:
                raise CheckpointError(
                    f"{pointer}: names {name!r}, which is not a checkpoint folder inside {run_dir}; "
                    "refusing to load from outside the run directory (write a step-XXXXXXXX name into LATEST, or delete it)"
                )
            cand = run_dir / name
            if (cand / CONFIG_FILE).is_file():
                return cand
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def rotate_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step-* checkpoints (never the one LATEST names; other
    names such as final/ or best/ are never touched). Returns the deleted paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    run_dir = Path(run_dir)
    for stale in run_dir.glob(".*.rm-*"):  # leftovers of an interrupted rotation
        _remove_dir(stale)
    latest = latest_checkpoint(run_dir)
    removed = []
    for p in list_checkpoints(run_dir)[:-keep_last]:
        if latest is not None and p.resolve() == latest.resolve():
            continue
        # rename to a hidden name first, so a crash mid-delete leaves nothing that lists as a checkpoint
        # (".rm-" leftovers are swept by the next save of that name, never restored)
        trash = Path(tempfile.mkdtemp(prefix=f".{p.name}.rm-", dir=p.parent))
        os.rmdir(trash)
        os.rename(p, trash)
        _remove_dir(trash)
        removed.append(p)
    return removed


def _resolve_dir(path: Path) -> Path:
    if path.is_dir() and not (path / CONFIG_FILE).exists():
        # a run directory: follow LATEST (so `--resume runs/x` works)
        if (path / LATEST_FILE).is_file() or list_checkpoints(path):
            latest = latest_checkpoint(path)
            if latest is not None:
                return latest
    if not path.exists():
        backups = [b for b in _siblings(path, "old") if (b / CONFIG_FILE).is_file()]
        if backups:  # interrupted save; the backup is the complete previous checkpoint
            return backups[-1]
    return path


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    training_state: bool = True,
    ema: bool = True,
) -> Checkpoint:
    """Load a checkpoint directory (or a run directory: its LATEST checkpoint).

    map_location: device for model/EMA weights. Training-state tensors stay on CPU (RNG states must;
    `optimizer.load_state_dict` moves moments to the parameters' device). training_state=False skips
    optimizer/scheduler/RNG state (inference); ema=False skips EMA weights.
    Raises CheckpointError with a one-line message for missing, incomplete, corrupt or too-new checkpoints.
    """
    path = _resolve_dir(Path(path))
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a finelap checkpoint: expected a directory, found a file")
    for required in (CONFIG_FILE, MODEL_FILE):
        if not (path / required).is_file():
            raise CheckpointError(f"{path}: not a finelap checkpoint: missing {required}")
    meta = _read_json(path / CONFIG_FILE)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / CONFIG_FILE}: corrupt checkpoint config (expected a JSON object)")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path / CONFIG_FILE}: not a finelap checkpoint config (no integer format_version)")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version} is newer than this finelap (supports <={FORMAT_VERSION}); upgrade finelap"
        )
    device = str(map_location)
    ckpt = Checkpoint(
        path=path,
        state_dict=_load_tensors(path / MODEL_FILE, device),
        config=meta.get("config") or {},
        meta=meta,
        step=int(meta.get("step", 0)),
    )
    if ema and (path / EMA_FILE).is_file():
        ckpt.ema_state = _load_tensors(path / EMA_FILE, device)
    if training_state and (path / TRAINER_FILE).is_file():
        ts = _read_json(path / TRAINER_FILE)
        if not isinstance(ts, dict) or not isinstance(ts.get("format_version"), int):
            raise CheckpointError(f"{path / TRAINER_FILE}: corrupt trainer state (expected an object with format_version)")
        if ts["format_version"] > FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: trainer state format {ts['format_version']} is newer than this finelap "
                f"(supports <={FORMAT_VERSION}); upgrade finelap"
            )
        tensors = _load_tensors(path / OPTIM_FILE, "cpu") if (path / OPTIM_FILE).is_file() else {}
        ckpt.optimizer_state = _unpack(ts.get("optimizer"), tensors, path / TRAINER_FILE)
        ckpt.scheduler_state = _unpack(ts.get("scheduler"), tensors, path / TRAINER_FILE)
        ckpt.scaler_state = _unpack(ts.get("scaler"), tensors, path / TRAINER_FILE)
        ckpt.rng_state = _unpack(ts.get("rng"), tensors, path / TRAINER_FILE)
        ckpt.trainer_state = _unpack(ts.get("trainer"), tensors, path / TRAINER_FILE)
    for f in sorted(path.glob("*.json")):
        if f.stem not in _RESERVED_JSON:
            ckpt.extra[f.stem] = _read_json(f)
    return ckpt
