"""Trained models out of ``seqpar train``: :func:`load` one for use, :func:`export` it to
the Hugging Face layout so the weights travel to other tools.

A source is any of:

- a run directory (``runs/tiny``): its newest checkpoint that verifies;
- a checkpoint directory (``runs/tiny/checkpoints/step_000300``), verified first;
- an exported directory (Hugging Face layout, below).

The Hugging Face layout (what :func:`export` writes and :func:`load` reads):

- ``model.safetensors``: every parameter under its ``HybridLM`` name, in one dtype (a
  tied LM head is stored once, as ``embed.weight``);
- ``config.json``: ``model_type`` ``"seqpar_hybrid"``, ``architectures`` ``["HybridLM"]``,
  every :class:`~seqpar.models.ModelConfig` field under its own name, the usual aliases
  (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``eos_token_id``,
  ``tie_word_embeddings``, ``torch_dtype``) and the seqpar tokenizer's identity;
- ``tokenizer.json`` (a ``tokenizers`` file; the byte tokenizer is written as a
  byte-level BPE without merges whose token ids are the byte values, end-of-text 256),
  ``tokenizer_config.json`` and ``special_tokens_map.json``.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from . import __version__
from .models import HybridLM, ModelConfig
from .ops.validate import fail
from .train import checkpoint
from .train.data import ByteTokenizer, HFTokenizer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
MODEL_TYPE = "seqpar_hybrid"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def _dtype_name(dtype: torch.dtype) -> str:
    names = {v: k for k, v in DTYPES.items()}
    if dtype not in names:
        fail("dtype", "one of torch." + ", torch.".join(DTYPES), dtype)
    return names[dtype]


def resolve(source) -> tuple[str, Path, list[str]]:
    """``(kind, path, notes)`` for a source: kind ``'export'`` or ``'checkpoint'``, the
    directory to read, and one line per damaged checkpoint passed over. Raises
    ValueError naming ``source`` when nothing there can be loaded."""
    path = Path(source)
    if (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
        return "export", path, []
    if path.is_dir() and checkpoint.step_of_name(path.name) is not None:
        found = [path]
    else:
        found = checkpoint.list_checkpoints(path)[::-1]
    if not found:
        fail("source", f"a run directory with checkpoints, a checkpoint directory (step_N) or "
             f"an exported directory ({CONFIG} + {WEIGHTS})", repr(str(source)))
    notes = []
    for ckpt in found:
        problem, _ = checkpoint.verify(ckpt, collective=False)
        if problem is None:
            if notes:
                notes.append(f"using {ckpt.name}, the newest checkpoint that verifies")
            return "checkpoint", ckpt, notes
        notes.append(f"checkpoint {ckpt.name} is damaged: {problem}")
    fail("source", "a checkpoint that verifies", "; ".join(notes))


def _checkpoint_tokenizer(path: Path, meta: dict):
    desc = meta["tokenizer"]
    if desc["name"] == ByteTokenizer.name:
        return ByteTokenizer()
    own = path / checkpoint.TOKENIZER
    trained = (meta.get("config") or {}).get("tokenizer")
    for candidate in (own, Path(trained) if trained else None):
        if candidate is not None and candidate.is_file():
            tok = HFTokenizer(candidate)
            if tok.describe() == desc:
                return tok
    fail("source", f"the tokenizers file the checkpoint was trained with ({desc['name']}), "
         f"in {own} or at {trained}", "neither matches")


def _load_checkpoint(path: Path, device) -> tuple[HybridLM, object, dict]:
    meta = checkpoint.read_meta(path)
    tokenizer = _checkpoint_tokenizer(path, meta)
    with torch.device(device):
        model = HybridLM(ModelConfig(**meta["model"]))
    state = get_model_state_dict(model)
    with warnings.catch_warnings():  # one process without a process group is fine here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": state}, checkpoint_id=str(path), no_dist=True)
    set_model_state_dict(model, state)
    return model, tokenizer, {"step": meta.get("step")}


def _load_export(path: Path, device) -> tuple[HybridLM, object, dict]:
    from safetensors.torch import load_model

    config = json.loads((path / CONFIG).read_text())
    if config.get("model_type") != MODEL_TYPE:
        fail("source", f"an exported seqpar model ({CONFIG} with model_type {MODEL_TYPE!r})",
             f"model_type {config.get('model_type')!r} in {path / CONFIG}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    with torch.device(device):
        model = HybridLM(ModelConfig(**{k: v for k, v in config.items() if k in fields}))
    model.to(DTYPES[config.get("torch_dtype", "float32")])
    load_model(model, str(path / WEIGHTS), strict=True, device=str(device))
    if config["seqpar_tokenizer"]["name"] == ByteTokenizer.name:
        tokenizer = ByteTokenizer()
    else:
        tokenizer = HFTokenizer(path / TOKENIZER)
    return model, tokenizer, {"step": config.get("seqpar_step")}


def load_with_info(source, *, device=None, dtype=None):
    """:func:`load`, plus ``info`` (``{"step", "path", "notes"}``: the training step, the
    directory read and the damaged checkpoints passed over)."""
    kind, path, notes = resolve(source)
    device = torch.device(device or "cpu")
    loader = _load_export if kind == "export" else _load_checkpoint
    model, tokenizer, info = loader(path, device)
    if dtype is not None:
        model.to(DTYPES[_dtype_name(dtype)])
    model.eval().requires_grad_(False)
    return model, tokenizer, dict(info, path=path, notes=notes)


def load(source, *, device=None, dtype=None):
    """A trained model and its tokenizer, ready for inference.

    Args:
        source: a run directory, a checkpoint directory or an exported directory (see
            the module docstring); a run's damaged newest checkpoints are passed over with
            a warning, never loaded.
        device: where to build the model (default CPU).
        dtype: parameter dtype (default: as stored, float32 for checkpoints).
    Returns:
        ``(model, tokenizer)``: a :class:`~seqpar.models.HybridLM` in eval mode without
        gradients, and a tokenizer with ``encode(str) -> int32 (N,)`` and
        ``decode(ids) -> str``.
    """
    model, tokenizer, info = load_with_info(source, device=device, dtype=dtype)
    if info["notes"]:
        warnings.warn("; ".join(info["notes"]), stacklevel=2)
    return model, tokenizer


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (what a ByteLevel pre-tokenizer maps
    bytes to)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_tokenizer_json() -> dict:
    """The byte tokenizer as a ``tokenizers`` file: byte-level BPE without merges, token id
    = byte value, ``<|endoftext|>`` = 256."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    eos = ByteTokenizer()
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": eos.eos_id, "content": eos.eos_token, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {c: i for i, c in enumerate(_byte_level_alphabet())}, "merges": []},
    }


def export(source, out, *, dtype=None, overwrite: bool = False) -> Path:
    """Write the model of ``source`` (run, checkpoint or export) to ``out`` in the Hugging
    Face layout (module docstring), in ``dtype`` (default: as stored). ``out`` must not
    exist unless ``overwrite``. Returns ``out``."""
    from safetensors.torch import save_model

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        fail("out", "a new or empty directory (--overwrite / overwrite=True writes into it)",
             repr(str(out)))
    model, tokenizer, info = load_with_info(source, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    cfg = model.config
    save_model(model, str(out / WEIGHTS), metadata={"format": "pt"})
    config = {
        "architectures": ["HybridLM"], "model_type": MODEL_TYPE, "seqpar_version": __version__,
        "seqpar_step": info["step"], "torch_dtype": _dtype_name(dtype),
        **cfg.to_dict(),
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.mlp_hidden,
        "tie_word_embeddings": cfg.tie_embeddings, "eos_token_id": tokenizer.eos_id,
        "seqpar_tokenizer": tokenizer.describe(),
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if isinstance(tokenizer, ByteTokenizer):
        (out / TOKENIZER).write_text(json.dumps(byte_tokenizer_json(), ensure_ascii=False))
    else:
        shutil.copyfile(tokenizer.path, out / TOKENIZER)
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.eos_token,
         "model_max_length": cfg.max_seq_len, "clean_up_tokenization_spaces": False}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": tokenizer.eos_token},
                                                            indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    """``seqpar export``: command-line entry point; returns the exit status."""
    import argparse
    import sys

    from .train.config import HelpFormatter

    p = argparse.ArgumentParser(
        prog="seqpar export",
        description="Write a trained model in the Hugging Face layout: model.safetensors, "
                    "config.json, tokenizer.json (read back with seqpar.load(DIR) or "
                    "seqpar generate DIR).",
        formatter_class=HelpFormatter)
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="a run directory (its newest checkpoint that verifies) or a checkpoint "
                        "directory")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (new or empty)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="weight dtype (default: as trained, float32)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    args = p.parse_args(argv)
    try:
        _, path, notes = resolve(args.source)
        for note in notes:
            print(f"seqpar export: {note}", file=sys.stderr)
        out = export(path, args.out, dtype=DTYPES[args.dtype] if args.dtype else None,
                     overwrite=args.overwrite)
    except ValueError as e:
        print(f"seqpar export: error: {e}", file=sys.stderr)
        return 2
    print(f"seqpar export: {path} -> {out} ({', '.join(sorted(f.name for f in out.iterdir()))})")
    return 0
