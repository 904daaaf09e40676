"""A model directory that declares custom code (an `auto_map` in its config.json) is refused with
one clear error, and its code never runs: not when a checkpoint points its text tower at it, not
when stdin answers transformers' "trust this code?" prompt with "y"."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from finelap.errors import ConfigError
from finelap.models.audio_encoders import HFAudioEncoder
from finelap.models.text_encoders import HFTextEncoder, TextEncoderConfig

from test_infer import make_checkpoint
from tinyfactory import tiny_text_dir

REPO = Path(__file__).resolve().parents[1]


def custom_code_dir(root: Path, marker: Path, where: str = "config.json") -> Path:
    """A copy of the tiny BERT whose `where` file maps the auto classes to a module that writes
    `marker` when imported (with a model_type transformers does not know, so only that code could
    load it)."""
    out = root / "custom_code_model"
    shutil.copytree(tiny_text_dir(root / "text"), out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = "finelap_custom"
    (out / "config.json").write_text(json.dumps(cfg))
    target = out / where
    obj = json.loads(target.read_text()) if target.exists() else {}
    obj["auto_map"] = {"AutoConfig": "custom_model.CustomConfig", "AutoModel": "custom_model.CustomModel",
                       "AutoTokenizer": ["custom_model.CustomTokenizer", None]}  # fmt: skip
    target.write_text(json.dumps(obj))
    (out / "custom_model.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('custom code ran')\n"
        "from transformers import BertConfig, BertModel, BertTokenizer\n"
        "class CustomConfig(BertConfig):\n    model_type = 'finelap_custom'\n"
        "class CustomModel(BertModel):\n    config_class = CustomConfig\n"
        "class CustomTokenizer(BertTokenizer):\n    pass\n"
    )
    return out


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_text_tower_with_custom_code_is_refused(tmp_path, where):
    marker = tmp_path / "MARKER"
    d = custom_code_dir(tmp_path, marker, where)
    with pytest.raises(ConfigError) as ei:
        HFTextEncoder(TextEncoderConfig(path=str(d)))
    assert str(ei.value).startswith(f"{d / where}: declares custom code (auto_map -> custom_model.")
    assert "trust_remote_code=False" in str(ei.value)
    assert not marker.exists()


def test_audio_tower_with_custom_code_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    d = custom_code_dir(tmp_path, marker)
    with pytest.raises(ConfigError, match="declares custom code"):
        HFAudioEncoder(d)
    assert not marker.exists()


def test_cli_never_runs_checkpoint_code_even_when_stdin_says_yes(tmp_path):
    """The audit: a checkpoint whose config.json points model.text.path at a directory with custom
    code, and `echo y | finelap classify ...`."""
    marker = tmp_path / "MARKER"
    evil = custom_code_dir(tmp_path / "evil", marker)
    ckpt = make_checkpoint(tmp_path)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["config"]["model"]["text"]["path"] = str(evil)
    (ckpt / "config.json").write_text(json.dumps(meta))
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(1600, np.float32), 16000)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # fmt: skip
    cmd = [sys.executable, "-m", "finelap.cli", "classify", str(wav), "--labels", "dog", "--checkpoint", str(ckpt)]
    r = subprocess.run(cmd, input="y\n" * 10, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("finelap classify: error: ") and "declares custom code" in lines[0], r.stderr
    assert not marker.exists()
