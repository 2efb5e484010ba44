"""Offline text, a byte-level tokenizer, fixed-length blocks and client partitions.

Nothing here downloads anything. The default corpus is the docstrings and
comments of a fixed list of Python standard-library modules, which every
machine with Python carries; the tokenizer is byte-level, so it needs no
vocabulary file. Other text comes in through :func:`load_text` (local
``.txt`` / ``.jsonl`` files, or a hub dataset when the machine is online).

The partitioners live in :mod:`secure_xfl.training.partition` and are
re-exported here.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from secure_xfl.errors import TrainingError
from secure_xfl.training.partition import (
    PartitionError,
    dirichlet_partition,
    dynamic_partition,
    fixed_partition,
    rebalance,
)

__all__ = [
    "DEFAULT_MODULES",
    "Blocks",
    "ByteTokenizer",
    "DataError",
    "Document",
    "PartitionError",
    "default_corpus",
    "default_documents",
    "dirichlet_partition",
    "dynamic_partition",
    "fixed_partition",
    "load_text",
    "make_blocks",
    "rebalance",
    "train_eval_split",
]


class DataError(TrainingError):
    """Text could not be found, read or turned into training blocks."""

    code = "data"


# --------------------------------------------------------------------------- tokenizer


class ByteTokenizer:
    """UTF-8 bytes as tokens 0–255, plus three specials; needs no vocabulary file."""

    PAD = 256
    BOS = 257
    EOS = 258
    vocab_size = 259

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text`` (optionally framed by BOS / EOS)."""
        ids = list(text.encode("utf-8"))
        return ([self.BOS] if bos else []) + ids + ([self.EOS] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; specials are dropped, broken UTF-8 is replaced, not raised."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- corpus


class Document(NamedTuple):
    """One piece of text and where it came from (used as the non-IID label)."""

    source: str
    text: str


#: Standard-library modules whose docstrings and comments form the default corpus.
#: Fixed and sorted so the corpus is the same on every run of one Python version;
#: names missing from an installation are skipped rather than failing.
DEFAULT_MODULES: tuple[str, ...] = tuple(
    sorted(
        """
        argparse ast asyncio.base_events asyncio.events asyncio.streams asyncio.tasks
        base64 bisect calendar collections configparser contextlib copy csv dataclasses
        datetime difflib email.message email.utils enum fractions ftplib functools
        gettext glob heapq hmac html http.client http.server imaplib inspect ipaddress
        json json.decoder json.encoder logging logging.handlers mailbox
        multiprocessing.pool numbers operator optparse os pathlib pdb pickle pprint
        queue random re shutil smtplib socket socketserver statistics string subprocess
        tarfile tempfile textwrap threading tokenize traceback typing unittest.case
        unittest.mock urllib.parse urllib.request uuid warnings zipfile
        """.split()
    )
)


def _module_path(stdlib: Path, name: str) -> Path | None:
    base = stdlib.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


@functools.lru_cache(maxsize=256)
def _docs_and_comments(path: Path) -> str:
    """Docstrings and whole-line comments of one Python file, in source order."""
    source = path.read_text(encoding="utf-8")
    parts: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                parts.append((getattr(node, "lineno", 0), doc))
    # Whole-line comments by a line scan: ``tokenize`` would be exact but costs
    # seconds per megabyte; a '#' line inside a string literal is harmless here.
    for lineno, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            # Shebangs, pragmas and separator lines are noise, not language.
            if len(text) > 3 and not text.startswith(("!", "-*-", "type:", "noqa", "pragma")):
                parts.append((lineno, text))
    parts.sort(key=lambda p: p[0])  # stable: a docstring precedes comments on its line
    return "\n".join(p[1] for p in parts)


def default_documents(
    max_bytes: int = 2_000_000, modules: Sequence[str] = DEFAULT_MODULES
) -> list[Document]:
    """Docstrings and comments of ``modules`` from this Python's standard library.

    One document per module (source = module name), in the given order, cut so
    the UTF-8 total stays within ``max_bytes``. Deterministic for one Python
    version; different versions carry slightly different text.
    """
    if max_bytes < 1:
        raise DataError("max_bytes must be positive")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs: list[Document] = []
    budget = max_bytes
    for name in modules:
        path = _module_path(stdlib, name)
        if path is None:
            continue
        try:
            text = _docs_and_comments(path)
        except (OSError, SyntaxError, ValueError):
            continue  # an odd installation must not break the demo
        raw = text.encode("utf-8")[:budget]
        if not raw:
            continue
        docs.append(Document(name, raw.decode("utf-8", errors="ignore")))
        budget -= len(raw)
        if budget <= 0:
            break
    if not docs:
        raise DataError(f"no standard-library sources found under {stdlib}")
    return docs


def default_corpus(max_bytes: int = 2_000_000) -> str:
    """The default corpus as one string (documents separated by blank lines)."""
    return "\n\n".join(d.text for d in default_documents(max_bytes))


def load_text(
    source: str | Path | Sequence[str | Path],
    *,
    text_field: str = "text",
    split: str = "train",
    max_bytes: int | None = None,
) -> list[Document]:
    """Documents from local files or a hub dataset, through ``datasets``.

    ``source`` is a ``.txt`` file (one document per file), a ``.jsonl`` / ``.json``
    file (one document per record, text in ``text_field``), a directory of such
    files, a list of them, or otherwise a hub dataset id (needs the internet;
    offline this raises :class:`DataError`). ``max_bytes`` caps the total.
    """
    import datasets  # heavy import, only when someone actually loads text

    files: list[Path] = []
    items = [source] if isinstance(source, str | Path) else list(source)
    for item in items:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl", ".json")))
        elif p.exists():
            files.append(p)
        elif len(items) > 1 or p.suffix in (".txt", ".jsonl", ".json"):
            raise DataError(f"text file {p} does not exist")
    docs: list[Document] = []
    try:
        if files:
            for f in files:
                if f.suffix == ".txt":
                    ds = datasets.load_dataset(
                        "text", data_files=str(f), split="train", sample_by="document"
                    )
                    docs.extend(Document(f.name, str(r["text"])) for r in ds)
                else:
                    ds = datasets.load_dataset("json", data_files=str(f), split="train")
                    if text_field not in ds.column_names:
                        raise DataError(f"{f} has no field {text_field!r}")
                    docs.extend(
                        Document(f"{f.name}:{i}", str(r[text_field])) for i, r in enumerate(ds)
                    )
        else:
            ds = datasets.load_dataset(str(source), split=split)
            if text_field not in ds.column_names:
                raise DataError(f"dataset {source!r} has no field {text_field!r}")
            docs = [Document(f"{source}:{i}", str(r[text_field])) for i, r in enumerate(ds)]
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types (network, format, missing)
        raise DataError(
            f"could not load text from {source!r}: {exc} (a hub dataset id needs the "
            "internet; offline, pass local .txt/.jsonl files)"
        ) from exc
    if max_bytes is not None:
        out, budget = [], max_bytes
        for d in docs:
            raw = d.text.encode("utf-8")[:budget]
            if not raw:
                break
            out.append(Document(d.source, raw.decode("utf-8", errors="ignore")))
            budget -= len(raw)
        docs = out
    if not docs:
        raise DataError(f"no text found in {source!r}")
    return docs


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Blocks:
    """Fixed-length token blocks and the source label of each."""

    tokens: np.ndarray
    """``(n, block_size)`` token ids (uint16: the byte vocabulary fits)."""
    labels: np.ndarray
    """``(n,)`` index into :attr:`label_names` of each block's document source."""
    label_names: tuple[str, ...]
    """Distinct sources, in first-seen order."""

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.tokens.shape[1])

    def subset(self, indices: Sequence[int] | np.ndarray) -> Blocks:
        """The blocks at ``indices`` (e.g. one client's partition)."""
        idx = np.asarray(indices, dtype=np.int64)
        return Blocks(self.tokens[idx], self.labels[idx], self.label_names)


def make_blocks(
    documents: Sequence[Document] | str,
    block_size: int = 64,
    tokenizer: ByteTokenizer | None = None,
) -> Blocks:
    """Tokenise each document (ending in EOS) and cut it into ``block_size`` blocks.

    Blocks never straddle two documents, so each has one source label; a
    document's last partial block is dropped.
    """
    if block_size < 2:
        raise DataError("block_size must be at least 2")
    tok = tokenizer or ByteTokenizer()
    docs = [Document("text", documents)] if isinstance(documents, str) else list(documents)
    names: dict[str, int] = {}
    chunks: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for d in docs:
        ids = np.asarray(tok.encode(d.text, eos=True), dtype=np.uint16)
        n = len(ids) // block_size
        if n == 0:
            continue
        label = names.setdefault(d.source, len(names))
        chunks.append(ids[: n * block_size].reshape(n, block_size))
        labels.append(np.full(n, label, dtype=np.int32))
    if not chunks:
        raise DataError(f"text too short for a single block of {block_size} tokens")
    return Blocks(np.concatenate(chunks), np.concatenate(labels), tuple(names))


def train_eval_split(blocks: Blocks, eval_fraction: float = 0.1) -> tuple[Blocks, Blocks]:
    """Deterministic held-out split: every k-th block (k ≈ 1/eval_fraction) is held out.

    Interleaving rather than taking the tail keeps both splits drawn from every
    source, so the held-out loss measures the same distribution as training.
    """
    if not 0 < eval_fraction < 1:
        raise DataError("eval_fraction must be in (0, 1)")
    k = max(2, round(1 / eval_fraction))
    idx = np.arange(len(blocks))
    held = idx % k == k - 1
    if not held.any() or held.all():
        raise DataError(f"{len(blocks)} blocks are too few to hold out {eval_fraction:.0%}")
    return blocks.subset(idx[~held]), blocks.subset(idx[held])
