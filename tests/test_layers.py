"""Each module on its floor: no module under src/finelap imports from a higher layer.

The sources are parsed with `ast` (nothing is imported), so an import inside a function (the
package's lazy imports) counts like one at the top. Relative imports are resolved to package
paths; `from pkg import name` counts as an import of `pkg.name` when that is a module.

Layers, bottom to top (a module may import its own floor and the floors below it):

  0  _version, errors, utils, dist      no finelap imports beyond this floor; dist = torch.distributed helpers
  1  registry, audio, mel_config        name -> builder tables; waveforms, log-mel, frames <-> seconds; MelConfig (no torch)
  2  config, model_config, loss_config  typed run config (AudioConfig extends MelConfig); ModelConfig, LossConfig (no torch)
  3  checkpoint                         checkpoint directory format and file I/O (safetensors + JSON)
  4  data                               manifests, phrases, batching/collation, synthesis
  5  eval, scoring, search, streaming   metrics and evaluators over functions/arrays, never models
     demo                               demo material built on data (the `finelap corpus` pool); data.corpus
                                        is its old path, a re-export placed on this floor
  6  models                             encoders, heads, the two-tower model, loading a checkpoint
  7  losses                             objectives over model outputs (may use models' types, dist)
  8  infer, calibration, hear           Pipeline: a loaded model + scoring + post-processing (infer/ is a
                                        package: pipeline, sources, labels, postprocess, index)
  9  train                              the loop (evaluates through infer, calibrates at the end)
 10  commands, cli, finelap (package)   the command line; the package root re-exports Pipeline

Known exception (not an import statement, so not seen here): registry.LOSSES imports every module
of finelap.losses on its first lookup (LossConfig, floor 2, looks objectives up).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "finelap"

# (module or package prefix, floor); the longest matching prefix decides
LAYERS: list[tuple[str, int]] = [
    ("finelap._version", 0), ("finelap.errors", 0), ("finelap.utils", 0), ("finelap.dist", 0),
    ("finelap.registry", 1), ("finelap.audio", 1), ("finelap.mel_config", 1),
    ("finelap.config", 2), ("finelap.model_config", 2), ("finelap.loss_config", 2),
    ("finelap.checkpoint", 3),
    ("finelap.data", 4),
    ("finelap.eval", 5), ("finelap.scoring", 5), ("finelap.search", 5), ("finelap.streaming", 5),
    ("finelap.demo", 5), ("finelap.data.corpus", 5),  # data.corpus: the old path of demo.corpus, a re-export
    ("finelap.models", 6),
    ("finelap.losses", 7),
    ("finelap.infer", 8), ("finelap.calibration", 8), ("finelap.hear", 8),
    ("finelap.train", 9),
    ("finelap.commands", 10), ("finelap.cli", 10), ("finelap", 10),
]  # fmt: skip


def floor_of(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, floor)
    for prefix, floor in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
            best = (len(prefix), floor)
    return None if best is None else best[1]


def module_name(path: Path, root: Path = SRC) -> tuple[str, bool]:
    """('finelap.x.y', is_package) for a source file under `root`."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def all_modules(root: Path = SRC) -> set[str]:
    return {module_name(p, root)[0] for p in (root / PKG).rglob("*.py")}


def imported_modules(module: str, is_package: bool, source: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, finelap module) for every finelap import in `source`, relative ones resolved."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name == PKG or a.name.startswith(PKG + ".")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(package) - 1:
                    raise AssertionError(f"{module}:{node.lineno}: relative import beyond the package")
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
                if not (target == PKG or target.startswith(PKG + ".")):
                    continue
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{a.name}"
                out.append((node.lineno, sub if sub in known else target))
    return out


def upward_imports(module: str, is_package: bool, source: str, known: set[str]) -> list[str]:
    """Violations: an import of a higher floor, or of / from a module that has no floor."""
    own = floor_of(module)
    if own is None:
        return [f"{module}: not placed in LAYERS"]
    bad = []
    for line, target in sorted(set(imported_modules(module, is_package, source, known))):
        floor = floor_of(target)
        if floor is None:
            bad.append(f"{module}:{line} imports {target}, which is not placed in LAYERS")
        elif floor > own:
            bad.append(f"{module}:{line} (floor {own}) imports {target} (floor {floor}): upward")
    return bad


def test_no_module_imports_upward() -> None:
    known = all_modules()
    files = sorted((SRC / PKG).rglob("*.py"))
    assert len(files) > 30  # the walk found the package
    bad = []
    for path in files:
        mod, is_pkg = module_name(path)
        bad += upward_imports(mod, is_pkg, path.read_text(encoding="utf-8"), known)
    assert not bad, "imports that run up the layers (see the docstring of tests/test_layers.py):\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "module, source",
    [
        ("finelap.losses.clip", "from ..train.dist import gather_with_grad\n"),  # the original offence
        ("finelap.models.build", "def load():\n    from ..train import slap\n"),  # lazy, inside a function
        ("finelap.data.batching", "import finelap.losses.clip\n"),  # absolute
        ("finelap.dist", "from . import config\n"),  # `from . import submodule`
        ("finelap.checkpoint", "from finelap import Pipeline\n"),  # the package root is the top floor
        ("finelap.data.manifests", "from ..demo import corpus\n"),  # the data layer does not use the demo pool
        ("finelap.models.layers", "from ..infer.sources import pad\n"),  # the new modules sit on their package's floor
    ],
)
def test_checker_flags_an_upward_import(module: str, source: str) -> None:
    known = all_modules()
    bad = upward_imports(module, False, source, known)
    assert len(bad) == 1 and "upward" in bad[0], bad


def test_checker_allows_downward_and_same_floor_imports() -> None:
    known = all_modules()
    src = "from ..dist import all_gather_sizes\nfrom ..models.model import FineLAPModel\nfrom .frame import bilinear_bce_sum\n"
    assert upward_imports("finelap.losses.clip", False, src, known) == []
    assert upward_imports("finelap.losses", True, "from .clip import info_nce\nfrom . import frame\n", known) == []
    assert floor_of("finelap.losses.new_objective") == floor_of("finelap.losses")  # new files inherit the floor
    assert floor_of("finelap.infer.pipeline") == floor_of("finelap.infer") and floor_of("finelap.models.hf_encoders") == 6
    assert upward_imports("finelap.data.corpus", False, "from ..demo.corpus import build_corpus\n", known) == []
    assert upward_imports("finelap.infer.pipeline", False, "from . import index\nfrom ..models.build import load_pretrained\n", known) == []


def test_new_modules_start_on_the_top_floor() -> None:
    # a new top-level module is on the top floor until placed: importing it from below fails
    assert floor_of("finelap.newthing") == max(f for _, f in LAYERS)
    assert upward_imports("other.module", False, "", all_modules()) == ["other.module: not placed in LAYERS"]
