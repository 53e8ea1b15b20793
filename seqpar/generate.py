"""``seqpar generate``: sample text from a trained model, streaming it as it comes.

The prompt runs once through the parallel forward (:meth:`HybridLM.prefill`), which
returns every layer's generation cache: recurrent states (and short-convolution tails)
for linear layers, a KV cache for attention, the input history for Hyena. Each new token
is then one :meth:`HybridLM.step`, so a linear layer costs the same for every token.
"""
from __future__ import annotations

import argparse
import codecs
import sys
import time
from dataclasses import dataclass

import torch

from .ops.validate import fail
from .train.config import HelpFormatter


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens from ``logits (B, V)`` (any float dtype): ``(B, 1)`` int64.

    temperature 0 takes the most likely token; otherwise softmax of ``logits /
    temperature`` restricted to the ``top_k`` most likely tokens and to the smallest set
    whose probability reaches ``top_p`` (nucleus; the most likely token is always kept).
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p.
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


def check_sampling(temperature, top_k, top_p, vocab_size: int) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        fail("temperature", "a number >= 0 (0: the most likely token)", repr(temperature))
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not 1 <= top_k <= vocab_size):
        fail("top_k", f"None or an int in [1, {vocab_size}]", repr(top_k))
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        fail("top_p", "None or a number in (0, 1]", repr(top_p))


class TextStream:
    """Token ids in, text out as soon as it is whole: bytes of a split UTF-8 character
    (byte tokenizer) or a token that decodes to an incomplete character wait for the
    rest."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0
        self._bytes = codecs.getincrementaldecoder("utf-8")("replace") \
            if tokenizer.name == "bytes" else None

    def push(self, token: int) -> str:
        if self._bytes is not None:
            return self._bytes.decode(bytes([token])) if token < 256 else ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.sent = text[self.sent:], len(text)
        return new

    def flush(self) -> str:
        if self._bytes is not None:
            return self._bytes.decode(b"", final=True)
        text = self.tokenizer.decode(self.ids)
        new, self.sent = text[self.sent:], len(text)
        return new


@dataclass
class Generation:
    """What :func:`generate` did: the new text and tokens, the prompt's token count,
    the prefill time and the time of the per-token steps (seconds)."""
    text: str
    tokens: list[int]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second after the prompt (the first token comes from prefill)."""
        steps = len(self.tokens) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")


@torch.no_grad()
def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 200, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_at_eos: bool = True, on_text=None) -> Generation:
    """Continue ``prompt`` with up to ``max_new_tokens`` tokens.

    Args:
        model: a :class:`~seqpar.models.HybridLM` (its device and dtype are used).
        tokenizer: the model's tokenizer (``seqpar.load`` returns both).
        prompt: non-empty text.
        temperature, top_k, top_p: see :func:`sample`.
        seed: seeds the sampling generator (None: nondeterministic).
        stop_at_eos: end at the end-of-text token (not included in the text).
        on_text: called with each piece of text as soon as it decodes (streaming).
    Returns:
        :class:`Generation`.
    """
    if not isinstance(prompt, str) or not prompt:
        fail("prompt", "non-empty text (the model starts a document from it)", repr(prompt))
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        fail("max_new_tokens", "an int >= 1", repr(max_new_tokens))
    check_sampling(temperature, top_k, top_p, model.config.vocab_size)
    device = model.embed.weight.device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    ids = torch.as_tensor(tokenizer.encode(prompt), dtype=torch.int64, device=device)[None]
    stream, pieces, tokens = TextStream(tokenizer), [], []

    def emit(text):
        if text:
            pieces.append(text)
            if on_text is not None:
                on_text(text)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    model.eval()
    sync()
    t0 = time.perf_counter()
    logits, caches = model.prefill(ids)
    tok = sample(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    sync()
    t1 = time.perf_counter()
    for i in range(max_new_tokens):
        token = int(tok)  # the text streams, so each token comes to the host anyway
        if stop_at_eos and token == tokenizer.eos_id:
            break
        tokens.append(token)
        emit(stream.push(token))
        if i + 1 < max_new_tokens:
            logits, caches = model.step(tok, caches)
            tok = sample(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p,
                         generator=generator)
    sync()
    t2 = time.perf_counter()
    emit(stream.flush())
    return Generation("".join(pieces), tokens, ids.shape[1], t1 - t0, t2 - t1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seqpar generate",
        description="Sample a continuation of a prompt from a trained model, streaming the text "
                    "to stdout; the speed goes to stderr.",
        formatter_class=HelpFormatter)
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="a run directory (its newest checkpoint that verifies), a checkpoint "
                        "directory, or a directory written by seqpar export")
    p.add_argument("--prompt", required=True, help="text to continue (not empty)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add at most")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature; 0 takes the most likely token")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens only (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the most likely tokens whose probability reaches p "
                        "(default: all)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the sampling (default: a fresh one each run)")
    p.add_argument("--ignore-eos", dest="stop_at_eos", action="store_false",
                   help="keep going past the end-of-text token (default: stop there)")
    p.add_argument("--device", default=None,
                   help="where to run, e.g. cpu or cuda:0 (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float64"),
                   help="parameter dtype (default: bfloat16 on cuda, float32 on cpu)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for bad input)."""
    from .hub import DTYPES, load_with_info
    from .train.distributed import cpu_threads

    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    try:
        model, tokenizer, info = load_with_info(args.source, device=device, dtype=dtype)
        if not args.prompt:
            fail("--prompt", "non-empty text (the model starts a document from it)", "''")
        check_sampling(args.temperature, args.top_k, args.top_p, model.config.vocab_size)
        if args.max_new_tokens < 1:
            fail("--max-new-tokens", "an int >= 1", args.max_new_tokens)
    except ValueError as e:
        print(f"seqpar generate: error: {e}", file=sys.stderr)
        return 2
    for note in info["notes"]:
        print(f"seqpar generate: {note}", file=sys.stderr)
    if device.type == "cpu":
        cpu_threads(None, model.config.d_model)

    def show(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    show(args.prompt)
    out = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, stop_at_eos=args.stop_at_eos, on_text=show)
    show("\n")
    step = info["step"]
    print(f"seqpar generate: {len(out.tokens)} tokens at {out.tokens_per_s:.1f} tokens/s after a "
          f"{out.prompt_tokens}-token prompt ({out.prefill_seconds * 1e3:.0f} ms prefill); "
          f"{info['path']}" + (f" (step {step})" if step is not None else "")
          + f", {device.type}, {str(dtype).removeprefix('torch.')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
