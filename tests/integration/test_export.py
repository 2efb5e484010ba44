"""Take the model home: a real one-round LM federation, exported to Hugging Face files,
reloads with plain transformers + peft to the very loss the aggregator reported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from secure_xfl.errors import TrainingError
from secure_xfl.training.export import EXPORT_INFO, ExportError, export_model, find_rounds
from secure_xfl.training.federated_lm import DataSpec, LMEvaluator, initial_model
from secure_xfl.training.lm import LMConfig, evaluate
from tests.federation import federation, provision

pytestmark = [
    pytest.mark.timeout(240),
    # peft calls a transformers API deprecated in 5.x when loading an adapter; not ours.
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The aggregator's --out of a real run: key holder, aggregator --model lm, 2 LM clients."""
    tmp = tmp_path_factory.mktemp("export-run")
    root = provision(
        tmp,
        ["a", "b"],
        federation={"rounds": 1, "min_clients": 2},
        round={"local_steps": 2, "batch_size": 4, "timeout_s": 60.0},
    )
    with federation(root) as fed:
        fed.start_keyholder()
        fed.start_aggregator("lm")
        for c in ("a", "b"):
            fed.start_client(c, "--trainer", "lm")
        assert fed.wait("aggregator", timeout=150) == 0, fed.logs()
        for c in ("a", "b"):
            assert fed.wait(f"client-{c}", timeout=60) == 0, fed.logs()
    out = root / "agg-out"
    assert sorted(find_rounds(out)) == [0, 1]
    return out


def _last_loss(run_dir: Path) -> float:
    lines = (run_dir / "rounds.jsonl").read_text().splitlines()
    return float(json.loads(lines[-1])["loss"])


def test_export_reloads_to_the_reported_loss(run_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = export_model(run_dir, tmp_path / "export")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "base" / "model.safetensors").is_file()
    assert "bytes" in (out / "README.txt").read_text()
    info = json.loads((out / EXPORT_INFO).read_text())
    reported = _last_loss(run_dir)
    assert info["round"] == 1 and info["last_round"] == 0
    assert info["loss"] == reported
    assert info["config"] == json.loads(json.dumps(LMConfig().__dict__))

    # What a user runs: plain transformers + peft, nothing from secure-xfl.
    base = AutoModelForCausalLM.from_pretrained(out / "base", local_files_only=True)
    model = PeftModel.from_pretrained(base, out / "adapter", local_files_only=True)
    held = LMEvaluator(data=DataSpec()).blocks  # the aggregator's held-out blocks
    got = evaluate(model, held)["loss"]
    assert got == pytest.approx(reported, rel=1e-4)

    # The base carries the trained embeddings: the seeded initial base would not do.
    initial = json.loads((run_dir / "initial.json").read_text())["loss"]
    assert abs(reported - initial) > 1e-3
    untrained = next(v for k, v in initial_model().items() if k.endswith("transformer.wte.weight"))
    assert not np.allclose(base.state_dict()["transformer.wte.weight"].numpy(), untrained)
    # The README's optional merge gives one plain model with the same loss.
    merged = model.merge_and_unload()
    assert evaluate(merged, held)["loss"] == pytest.approx(reported, rel=1e-4)


def test_export_of_round_zero_is_the_initial_model(run_dir: Path, tmp_path: Path) -> None:
    out = export_model(run_dir, tmp_path / "r0", round=0)
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["round"] == 0 and info["last_round"] is None
    assert info["loss"] == json.loads((run_dir / "initial.json").read_text())["loss"]


def test_missing_or_mismatched_files_raise_export_error(run_dir: Path, tmp_path: Path) -> None:
    assert issubclass(ExportError, TrainingError)
    with pytest.raises(ExportError, match="does not exist"):
        export_model(tmp_path / "nowhere", tmp_path / "o1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match=r"no global-N\.npy"):
        export_model(tmp_path / "empty", tmp_path / "o2")
    with pytest.raises(ExportError, match=r"no global-7\.npy"):
        export_model(run_dir, tmp_path / "o3", round=7)

    bad = tmp_path / "bad"
    bad.mkdir()
    good = run_dir / "global-1.npy"
    (bad / "global-1.npy").write_bytes(good.read_bytes()[:-100])  # truncated
    with pytest.raises(ExportError, match="truncated"):
        export_model(bad, tmp_path / "o4")
    np.save(bad / "global-1.npy", np.zeros(1234), allow_pickle=False)  # wrong size
    with pytest.raises(ExportError, match="1234"):
        export_model(bad, tmp_path / "o5")
    np.save(bad / "global-1.npy", np.load(good, allow_pickle=False)[None, :], allow_pickle=False)
    with pytest.raises(ExportError, match="shape"):
        export_model(bad, tmp_path / "o6")
    (bad / "global-1.npy").write_bytes(b"not an npy file at all")
    with pytest.raises(ExportError, match="not a readable"):
        export_model(bad, tmp_path / "o7")
    np.save(bad / "global-1.npy", np.array([object()] * 3), allow_pickle=True)  # a pickle
    with pytest.raises(ExportError):
        export_model(bad, tmp_path / "o8")

    # Another model config: the vector does not fit.
    with pytest.raises(ExportError, match="another model config"):
        export_model(run_dir, tmp_path / "o9", cfg=LMConfig(lora_r=4))
    # A non-empty destination is never overwritten.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="refusing to overwrite"):
        export_model(run_dir, taken)
    assert (taken / "keep.txt").read_text() == "mine"
    shutil.rmtree(taken)


def test_full_finetune_export(tmp_path: Path) -> None:
    """full_finetune configs write one plain model; the vector is built as the coordinator does."""
    import torch
    from transformers import AutoModelForCausalLM

    from secure_xfl.crypto.codec import flatten, layout_of

    cfg = LMConfig(full_finetune=True, n_layer=1, n_embd=32, block_size=32)
    rng = np.random.default_rng(0)
    state = {
        k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32)
        for k, v in initial_model(cfg).items()
    }
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    run = tmp_path / "run"
    run.mkdir()
    np.save(run / "global-3.npy", flatten(tensors, layout_of(tensors)), allow_pickle=False)
    evaluator = LMEvaluator(cfg, DataSpec(eval_blocks=32))
    want = evaluator(state)["loss"]
    out = export_model(run, tmp_path / "out", cfg=cfg)
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["round"] == 3 and info["loss"] is None  # no rounds.jsonl: nothing reported
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert evaluate(model, evaluator.blocks)["loss"] == pytest.approx(want, rel=1e-6)
