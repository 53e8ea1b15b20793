"""Documents, tokenizers and packed batches.

A corpus is a list of documents (the standard library's ``*.py`` files by default). Each
document is tokenized and followed by the end-of-text token; the documents are
concatenated into one token stream, cut into windows of ``seq_len + 1`` tokens (inputs
and next-token targets). A step takes ``batch_size`` windows per data-parallel rank in a
seeded order that depends only on the number of windows consumed, so resuming at a
sample index replays exactly.

Packed batches (the default) are one row ``(1, batch_size * seq_len)`` with ``cu_seqlens``
at every document start and every window start, so no state or attention crosses a
document. Targets whose input token is the end-of-text token (the first token of the next
document, unpredictable after a reset) are ignored (-100). Under sequence parallelism each
rank takes its shard of the stream (``seqpar.parallel.shard``) and all ranks pass the same
global ``cu_seqlens``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import TEXT_SUFFIXES, config_fail

IGNORE_INDEX = -100
# End-of-text tokens looked up, in order, in a tokenizers file.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]", "<|im_end|>")


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; 256 is the end-of-text separator.

    Tokenizers share this interface: ``encode(text) -> int32 (N,)``, ``decode(ids) ->
    str``, ``vocab_size``, ``eos_id``, ``eos_token`` (its text) and ``describe()``, the identity that a checkpoint
    records and a resume must match.
    """

    name = "bytes"
    vocab_size = 257
    eos_id = 256
    eos_token = "<|endoftext|>"  # its spelling in an exported tokenizer.json

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class HFTokenizer:
    """A Hugging Face ``tokenizers`` JSON file; its end-of-text token separates documents."""

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            config_fail("--tokenizer", "the 'tokenizers' package (pip install seqpar[tokenizers])",
                        "it is not installed")
        # Identity for checkpoint compatibility: the file's content, wherever it lives.
        self.path = Path(path)
        self.name = "tokenizers:sha256:" + hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = [self._tok.token_to_id(t) for t in EOS_CANDIDATES]
        ids = [i for i in ids if i is not None]
        if not ids:
            config_fail("--tokenizer", "a tokenizer with an end-of-text token among "
                        + ", ".join(EOS_CANDIDATES), path)
        self.eos_id = ids[0]
        self.eos_token = self._tok.id_to_token(self.eos_id)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def describe(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


def load_tokenizer(path: str | None):
    return ByteTokenizer() if path is None else HFTokenizer(path)


def stdlib_files() -> list[Path]:
    """The standard library's own ``*.py`` files in sorted order, without third-party
    ``site-packages`` / ``dist-packages`` trees that live under the same directory."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


# Characters that text files hold besides printable ones: tab, newlines, form feed,
# vertical tab, escape (terminal colours in logs).
_TEXT_CONTROLS = frozenset("\t\n\r\f\v\x1b")


def is_binary(text: str) -> bool:
    """Whether decoded ``text`` is binary data rather than text: any NUL character, or
    more than 1% other control characters."""
    if "\x00" in text:
        return True
    sample = text[:1 << 20]
    controls = sum(1 for c in sample if c < " " and c not in _TEXT_CONTROLS)
    return controls > len(sample) // 100


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8 text (undecodable or binary)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None
    return None if is_binary(text) else text


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                config_fail("--data", f"one JSON object per line in {path}", f"line {n}: {e}")
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                config_fail("--data", f"a string field 'text' on every line of {path}", f"line {n}")
            texts.append(record["text"])
    return texts


def _file_texts(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return _jsonl_texts(path)
    text = _read_text(path)
    return [] if text is None else [text]


def load_documents(data: str | None) -> list[str]:
    """The documents of ``--data`` (see the module docstring); empty ones are dropped.

    A file is one document (any suffix), a ``.jsonl`` file one per line (its ``text``
    field), a folder every file below it with a suffix in ``TEXT_SUFFIXES`` (hidden files,
    non-UTF-8 and binary files skipped) in sorted order; None is the standard library's
    source. A single file of binary data (:func:`is_binary`) is refused.
    """
    if data is None:
        files = stdlib_files()
    else:
        path = Path(data)
        if path.is_dir():
            files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                           key=lambda p: p.relative_to(path).as_posix())
        else:
            files = [path]
            if path.suffix != ".jsonl" and _read_text(path) is None:
                config_fail("--data", "a UTF-8 text file", f"{str(path)!r}, which holds binary "
                            "data (not UTF-8, NUL bytes or control characters)")
    docs = [t for f in files for t in _file_texts(f) if t]
    if not docs:
        config_fail("--data", "at least one non-empty UTF-8 text document", f"{data!r}, whose "
                    f"{len(files)} files of the accepted kinds hold none")
    return docs


def split_names(n_docs: int, n_held: int) -> tuple[str, str]:
    """How messages name the training and evaluation splits that
    :func:`split_documents` makes of ``n_docs`` documents, ``n_held`` held out."""
    if n_docs == 1:
        return ("training split (the first nine tenths of the only document)",
                "evaluation split (the last tenth of the only document)")
    return (f"training split ({n_docs - n_held} of {n_docs} documents)",
            f"evaluation split ({n_held} of {n_docs} documents held out: --eval-docs, at most a fifth)")


def split_documents(docs: list[str], n_eval: int) -> tuple[list[str], list[str]]:
    """Hold out ``n_eval`` documents spread evenly over the corpus (at most a fifth of it);
    a corpus of one document gives its last tenth to evaluation."""
    if len(docs) == 1:
        text = docs[0]
        cut = len(text) * 9 // 10
        return [text[:cut]], [text[cut:]]
    n_eval = max(1, min(n_eval, len(docs) // 5))
    held = {round((i + 0.5) * len(docs) / n_eval) for i in range(n_eval)}
    held = {min(i, len(docs) - 1) for i in held}
    train = [d for i, d in enumerate(docs) if i not in held]
    return train, [docs[i] for i in sorted(held)]


def token_stream(docs: list[str], tokenizer) -> np.ndarray:
    """Concatenate the documents, each followed by ``eos_id``: int32 (N,)."""
    parts = []
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    for d in docs:
        parts.append(tokenizer.encode(d))
        parts.append(eos)
    return np.concatenate(parts)


@dataclass
class Batch:
    """One data-parallel rank's share of one step, or its SP shard.

    input_ids, targets: int64 (B, T) (whole) or (B, T / sp) (a shard); targets are -100
    where ignored.
    cu_seqlens: int32 (N + 1,) offsets of the whole packed stream (the same on every SP
    rank), or None (unpacked).
    """
    input_ids: torch.Tensor
    targets: torch.Tensor
    cu_seqlens: torch.Tensor | None

    def to(self, device) -> Batch:
        cu = None if self.cu_seqlens is None else self.cu_seqlens.to(device)
        return Batch(self.input_ids.to(device), self.targets.to(device), cu)


def pack_windows(windows: np.ndarray, eos_id: int, packing: bool):
    """``(B, T + 1)`` token windows -> full (unsharded) inputs, targets and cu_seqlens.

    Packed: inputs/targets ``(1, B T)`` and cu_seqlens with a boundary after every
    end-of-text token and at every window start. Unpacked: ``(B, T)``, no cu_seqlens.
    """
    x = torch.from_numpy(windows[:, :-1].astype(np.int64))
    y = torch.from_numpy(windows[:, 1:].astype(np.int64))
    y = y.masked_fill(x == eos_id, IGNORE_INDEX)
    if not packing:
        return x, y, None
    B, T = x.shape
    x, y = x.reshape(1, B * T), y.reshape(1, B * T)
    after_eos = (x[0] == eos_id).nonzero().flatten() + 1
    bounds = torch.cat([torch.arange(0, B * T + 1, T), after_eos])
    return x, y, torch.unique(bounds).to(torch.int32)


class WindowSampler:
    """Deterministic windows: sample ``i`` is window ``perm_e[i mod n]`` of epoch
    ``e = i // n``, each epoch a fresh seeded permutation (or in order for evaluation)."""

    def __init__(self, stream: np.ndarray, seq_len: int, seed: int, shuffle: bool,
                 split: str = "this split"):
        self.stream, self.seq_len, self.seed, self.shuffle = stream, seq_len, seed, shuffle
        self.n = (len(stream) - 1) // seq_len
        if self.n < 1:
            config_fail("--seq-len", f"at most {len(stream) - 1}: a window takes seq_len + 1 tokens "
                        f"and the {split} has {len(stream)} (lower --seq-len or give more data)",
                        seq_len)
        self._perm_epoch, self._perm = -1, None

    def _index(self, i: int) -> int:
        epoch, j = divmod(i, self.n)
        if not self.shuffle:
            return j
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return int(self._perm[j])

    def windows(self, start: int, count: int) -> np.ndarray:
        """Samples ``start .. start + count - 1`` as an int32 array (count, seq_len + 1)."""
        T = self.seq_len
        starts = [self._index(i) * T for i in range(start, start + count)]
        return np.stack([self.stream[s:s + T + 1] for s in starts])


class Loader:
    """Batches for one data-parallel rank.

    Step ``s`` covers global samples ``[s G, (s + 1) G)`` with ``G = dp * batch_size``
    (shifted by :meth:`seek`); data-parallel rank ``d`` takes its ``batch_size`` of them.
    The batch is whole: the ranks of a sequence-parallel group take their shards of it
    (``seqpar.parallel.shard``).
    """

    def __init__(self, sampler: WindowSampler, *, batch_size: int, eos_id: int, packing: bool,
                 dp_rank: int, dp: int):
        self.sampler, self.batch_size, self.eos_id, self.packing = sampler, batch_size, eos_id, packing
        self.dp_rank, self.dp = dp_rank, dp
        self.origin_step, self.origin_sample = 0, 0

    @property
    def samples_per_step(self) -> int:
        return self.dp * self.batch_size

    def seek(self, step: int, sample: int) -> None:
        """Make ``step`` start at global sample ``sample`` (a checkpoint's data position;
        a resumed run with another batch layout continues from the same sample)."""
        self.origin_step, self.origin_sample = step, sample

    def position(self, step: int) -> int:
        """The global sample index where ``step`` starts."""
        return self.origin_sample + (step - self.origin_step) * self.samples_per_step

    def batch(self, step: int) -> Batch:
        start = self.position(step) + self.dp_rank * self.batch_size
        return Batch(*pack_windows(self.sampler.windows(start, self.batch_size), self.eos_id, self.packing))
