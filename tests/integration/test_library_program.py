"""The README's library program is complete, runnable, and the same as examples/quickstart.py."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec

import secure_xfl as sx
from tests.conftest import contexts

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.py"


def readme_program() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Library use\n")
    end = text.index("\n## Threat model", start)
    blocks = re.findall(r"^```python\n(.*?)^```$", text[start:end], flags=re.S | re.M)
    assert len(blocks) == 1, "the Library use section holds exactly one python block"
    return str(blocks[0])


def test_readme_program_is_the_example() -> None:
    assert readme_program() == QUICKSTART.read_text()


def test_program_runs_and_prints_epsilon() -> None:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(QUICKSTART)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^audit OK: ε = \d+\.\d{3} at δ = \S+ after 1 round\(s\)$",
                     proc.stdout, flags=re.M), proc.stdout  # fmt: skip
    assert "no differential privacy applied" not in proc.stderr


def test_exports_cover_the_program() -> None:
    for name in ("DPConfig", "DPSpec", "PrivacyLedger", "Kit", "provision", "audit"):
        assert name in sx.__all__
        assert hasattr(sx, name)


def _seal_args(preset_name: str = "xfl-default") -> dict[str, Any]:
    _, public = contexts(preset_name)
    return {
        "ctx": public,
        "preset": sx.get_preset(preset_name),
        "run": "r",
        "round": 0,
        "client": "c0",
        "signing_key": ec.generate_private_key(ec.SECP256R1()),
    }


UPDATE = {"w": torch.full((8,), 0.01)}


def test_protect_update_requires_dp() -> None:
    with pytest.raises(TypeError, match="dp"):
        sx.protect_update(UPDATE, **_seal_args())
    with pytest.raises(TypeError, match="dp"):
        sx.protect_vector(np.zeros(8), layout=sx.layout_of(UPDATE), **_seal_args())


def test_protect_without_dp_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="secure_xfl.privacy.protect"):
        update = sx.protect_update(UPDATE, dp=None, **_seal_args())
    assert update.statement.dp is None
    assert any(
        r.levelno == logging.WARNING and "no differential privacy applied" in r.getMessage()
        for r in caplog.records
    )
    caplog.clear()
    dp = sx.DPConfig(clip_norm=1.0, noise_multiplier=1.0, min_clients=3)
    with caplog.at_level(logging.WARNING, logger="secure_xfl.privacy.protect"):
        sx.protect_update(UPDATE, dp=dp, **_seal_args())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _holder(state_dir: Path) -> sx.KeyHolder:
    secret, _ = contexts("xfl-default")
    return sx.KeyHolder(
        ctx=secret,
        preset=sx.get_preset("xfl-default"),
        policy=sx.KeyHolderPolicy(run="r", min_clients=1),
        client_keys={},
        state_dir=state_dir,
    )


TEMP_WARNING = "decrypt-each-round-once does not survive a temporary state_dir"


def test_keyholder_warns_on_temporary_state_dir(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    existing = tmp_path / "state"  # pytest's tmp_path lies under tempfile.gettempdir()
    existing.mkdir()
    with caplog.at_level(logging.WARNING, logger="secure_xfl.crypto.keyholder"):
        _holder(existing).close()
    assert any(TEMP_WARNING in r.getMessage() for r in caplog.records)


def test_keyholder_does_not_warn_on_a_kept_state_dir(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Outside the temp dir no warning, new or not: a first start is normal.
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path / "elsewhere"))
    (tmp_path / "kept").mkdir()
    with caplog.at_level(logging.WARNING, logger="secure_xfl.crypto.keyholder"):
        _holder(tmp_path / "kept").close()
        _holder(tmp_path / "new").close()
    assert not any(TEMP_WARNING in r.getMessage() for r in caplog.records)
