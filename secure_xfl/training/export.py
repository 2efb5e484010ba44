"""Take the model home: turn an aggregator's ``--out`` folder into Hugging Face files.

The aggregator (``secure-xfl aggregator --model lm --out DIR``) keeps only the
*trainable* part of the global model, as one flat float vector per completed
round: ``DIR/global-N.npy`` is the model after N aggregated rounds (``global-0``:
the seeded initial model). The vector is the trainable tensors of
:func:`~secure_xfl.training.lm.build_model` sorted by name and concatenated
(:func:`~secure_xfl.crypto.codec.layout_of` / :func:`~secure_xfl.crypto.codec.flatten`),
exactly as the coordinator builds it. Its held-out metrics are in
``DIR/rounds.jsonl`` (line ``"round": N-1``) or, for N = 0, ``DIR/initial.json``.

:func:`export_model` rebuilds the identical model from its :class:`LMConfig`,
loads the vector into it and writes:

* LoRA (the default): ``OUT/adapter`` (the peft adapter) and ``OUT/base`` (the
  base causal LM *with its trained values*: under the default config the token
  embedding / tied LM head, position embedding and layer norms are trained too,
  so the base is not the seeded initial one);
* ``full_finetune``: the whole model in ``OUT`` itself;
* ``OUT/secure-xfl-export.json`` (round, run folder, config, reported metrics)
  and ``OUT/README.txt`` (how to reload it and how to tokenise: UTF-8 bytes are
  the token ids, there is no tokenizer file).

Only safetensors and JSON are written; the vector is read with
``allow_pickle=False`` after its header has been checked against the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from secure_xfl.crypto.codec import layout_of, unflatten
from secure_xfl.errors import TrainingError
from secure_xfl.training.data import ByteTokenizer
from secure_xfl.training.lm import LMConfig, build_model, load_trainable, trainable_state

__all__ = ["EXPORT_INFO", "ExportError", "export_model", "find_rounds"]

log = logging.getLogger(__name__)

#: Name of the export's description inside ``out``.
EXPORT_INFO = "secure-xfl-export.json"

_GLOBAL = re.compile(r"global-(\d+)\.npy")


class ExportError(TrainingError):
    """A run folder cannot be exported: missing, incomplete, or not of this model."""

    code = "export"


def find_rounds(run_dir: Path) -> dict[int, Path]:
    """The saved global models of ``run_dir``: round N -> ``global-N.npy``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"run folder {run_dir} does not exist (the aggregator's --out)")
    found = {}
    for path in run_dir.iterdir():
        m = _GLOBAL.fullmatch(path.name)
        if m and path.is_file():
            found[int(m.group(1))] = path
    return dict(sorted(found.items()))


def _read_vector(path: Path, numel: int) -> np.ndarray:
    """The flat vector in ``path``; header and file size checked before the data is read."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ExportError(f"{path}: unsupported .npy version {version}")
            data_start = fh.tell()
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: not a readable .npy file: {exc}") from exc
    if dtype.kind != "f" or dtype.hasobject:
        raise ExportError(f"{path}: dtype {dtype} is not floating point")
    if tuple(shape) != (numel,):
        raise ExportError(
            f"{path}: holds shape {tuple(shape)}, but this model's trainable part has "
            f"{numel} values (was the run made with another model config?)"
        )
    expected = data_start + numel * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise ExportError(f"{path}: {size} bytes, expected {expected} (truncated or padded)")
    try:
        vec = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: cannot be read: {exc}") from exc
    vec = np.asarray(vec, dtype=np.float64).reshape(-1)
    if not np.isfinite(vec).all():
        raise ExportError(f"{path}: contains NaN or Inf")
    return vec


def _reported(run_dir: Path, round: int) -> dict[str, Any] | None:
    """What the aggregator logged for the model after ``round`` rounds, if anything."""
    if round == 0:
        path = run_dir / "initial.json"
        if not path.is_file():
            return None
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            log.warning("%s is not valid JSON; the export carries no initial metrics", path)
            return None
        return value if isinstance(value, dict) else None
    path = run_dir / "rounds.jsonl"
    if not path.is_file():
        return None
    found = None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            log.warning("%s:%d is not valid JSON (a run still writing?); skipped", path, n)
            continue
        if isinstance(rec, dict) and rec.get("round") == round - 1:
            found = rec  # the last line for that round wins
    return found


def _readme(cfg: LMConfig, round: int, *, trained_base: bool) -> str:
    tok = ByteTokenizer
    if cfg.full_finetune:
        load = (
            "from transformers import AutoModelForCausalLM\n"
            'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER", local_files_only=True)\n'
        )
    else:
        load = (
            "from peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM\n"
            'base = AutoModelForCausalLM.from_pretrained("THIS_FOLDER/base", '
            "local_files_only=True)\n"
            'model = PeftModel.from_pretrained(base, "THIS_FOLDER/adapter", '
            "local_files_only=True)\n"
            "model = model.merge_and_unload()  # optional: one plain model\n"
        )
    return (
        f"secure-xfl export: the global model after {round} federated round(s).\n\n"
        "Load it (Python, transformers + peft, no network needed):\n\n"
        f"{load}model.eval()\n\n"
        + (
            "base/ is NOT the untrained base: its embeddings and layer norms were\n"
            "trained with the adapter; always use this base/ with this adapter/.\n\n"
            if trained_base and not cfg.full_finetune
            else ""
        )
        + "Tokenisation: there is no tokenizer file. Token ids are the UTF-8 bytes of\n"
        f"the text (0-255), plus PAD={tok.PAD}, BOS={tok.BOS}, EOS={tok.EOS} "
        f"(vocab_size={tok.vocab_size}).\n"
        "Training documents each ended in EOS.\n\n"
        "import torch\n"
        'ids = torch.tensor([list("def main():".encode("utf-8"))])\n'
        f"out = model.generate(ids, max_new_tokens={max(1, min(40, cfg.block_size - 11))}, "
        f"do_sample=False, pad_token_id={tok.PAD})\n"
        'text = bytes(i for i in out[0].tolist() if i < 256).decode("utf-8", "replace")\n\n'
        f"Context length: {cfg.block_size} tokens.\n"
    )


def export_model(
    run_dir: Path,
    out: Path,
    *,
    round: int | None = None,
    cfg: LMConfig | None = None,
) -> Path:
    """Export the global model of an aggregator run in Hugging Face format; returns ``out``.

    ``run_dir``: the aggregator's ``--out`` folder. ``round``: which ``global-N.npy``
    (default: the latest, i.e. the most aggregated rounds). ``cfg``: the run's
    model config (default :class:`LMConfig()`, what ``--model lm`` uses); it must
    be the run's, since the model is rebuilt from it. ``out`` must be missing or
    empty. Raises :class:`ExportError` for a missing run folder or round, a vector
    that does not fit the model, or a non-empty ``out``.
    """
    run_dir, out = Path(run_dir), Path(out)
    cfg = cfg or LMConfig()
    rounds = find_rounds(run_dir)
    if not rounds:
        raise ExportError(f"{run_dir} holds no global-N.npy (was the aggregator run with --out?)")
    if round is None:
        round = max(rounds)
    elif round not in rounds:
        raise ExportError(f"{run_dir} has no global-{round}.npy (saved rounds: {sorted(rounds)})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder; refusing to overwrite")

    model = build_model(cfg)
    state = trainable_state(model)
    layout = layout_of({k: torch.from_numpy(v) for k, v in state.items()})
    vec = _read_vector(rounds[round], layout.numel)
    trained = {k: v.numpy().astype(np.float32) for k, v in unflatten(vec, layout).items()}
    load_trainable(model, trained)
    model.eval()

    out.mkdir(parents=True, exist_ok=True)
    trained_base = any("lora_" not in name for name in state)
    hf: Any = cast(Any, model)  # a transformers PreTrainedModel or a peft PeftModel
    if cfg.full_finetune:
        hf.save_pretrained(out, safe_serialization=True)
        written = {"model": "."}
    else:
        if trained_base:
            # The adapter only works with *this* trained base, not the one it started from.
            hf.peft_config["default"].base_model_name_or_path = None
        # save_embedding_layers=False: the (trained) embeddings go with the base below,
        # and peft's "auto" may ask the Hub about the base model.
        hf.save_pretrained(out / "adapter", safe_serialization=True, save_embedding_layers=False)
        hf.unload().save_pretrained(out / "base", safe_serialization=True)
        written = {"adapter": "adapter", "base": "base"}

    reported = _reported(run_dir, round)
    info = {
        "format": "secure-xfl-export/v1",
        "round": round,
        "last_round": round - 1 if round else None,
        "source": str(rounds[round].resolve()),
        "run_dir": str(run_dir.resolve()),
        "config": dataclasses.asdict(cfg),
        "layout_digest": layout.digest.hex(),
        "trainable_values": layout.numel,
        "loss": None if reported is None else reported.get("loss"),
        "metrics": reported,
        "files": written,
        "tokenizer": {
            "kind": "utf-8 bytes",
            "vocab_size": ByteTokenizer.vocab_size,
            "pad": ByteTokenizer.PAD,
            "bos": ByteTokenizer.BOS,
            "eos": ByteTokenizer.EOS,
        },
    }
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.txt").write_text(_readme(cfg, round, trained_base=trained_base))
    log.info("exported global-%d of %s to %s", round, run_dir, out)
    return out
