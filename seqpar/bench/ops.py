"""``seqpar bench ops``: forward and forward+backward time, tokens/s and peak memory of
every linear-family op against PyTorch SDPA (causal) and, when importable,
flash-linear-attention (FLA), on one CUDA GPU.

Shapes: T in ``--T`` with ``B = max(1, tokens // T)`` rows (``B T = 32K`` tokens up to
32K), 16 heads of 128, bf16. Times are ``triton.testing.do_bench`` medians. Each op's
time is also set against its memory-bandwidth floor: the bytes it must read and write
once (forward: q, k, v, gates, o; backward adds do, dq, dk, dv, gate gradients) over the
copy bandwidth measured in the same run. Peak memory is the allocator's peak during one
forward+backward less what was allocated before it (inputs), per token.

Writes a JSON (command, GPU, versions, date, all rows) and a PNG (tokens/s of
forward+backward against T, one line per op and peer).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from seqpar.ops import catalog

# The linear ops of the catalogue (variants such as retention run the same kernels).
OPS = catalog.names("linear", variants=False)
# seqpar op name -> FLA module and function
FLA = {"linear_attn": ("fla.ops.linear_attn", "chunk_linear_attn"),
       "simple_gla": ("fla.ops.simple_gla", "chunk_simple_gla"),
       "gla": ("fla.ops.gla", "chunk_gla"),
       "delta_rule": ("fla.ops.delta_rule", "chunk_delta_rule"),
       "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule")}


def make_inputs(op, B, T, H, D, device, dtype=torch.bfloat16, seed=0):
    """Leaves requiring grad ``{name: tensor}``: the catalogue's inputs of ``op`` with
    K = V = D, data inputs in ``dtype`` (mild decays)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return catalog.get(op).make_inputs(B, T, H, D, D, dtype=dtype, device=device, generator=gen,
                                       requires_grad=True)


def seqpar_fn(op):
    # 'triton' explicitly: this benchmark measures the kernels, and a CPU run must fail
    # rather than time the PyTorch path under their name.
    f = catalog.get(op).fn
    return lambda xs: f(**xs, backend="triton")[0]


def fla_fn(op):
    import importlib

    mod, name = FLA[op]
    f = getattr(importlib.import_module(mod), name)
    if op == "linear_attn":
        return lambda xs: f(xs["q"], xs["k"], xs["v"], normalize=False)[0]
    return lambda xs: f(*xs.values())[0]


def sdpa_fn(xs):
    q, k, v = (xs[n].transpose(1, 2) for n in "qkv")
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def io_bytes(xs, out_like):
    """Bytes read and written once: forward (inputs + output) and forward+backward
    (that, plus the output gradient read and every input gradient written)."""
    nb = lambda t: t.numel() * t.element_size()  # noqa: E731
    fwd = sum(nb(x) for x in xs) + nb(out_like)
    return fwd, 2 * fwd + sum(nb(x) for x in xs)


def measure(fn, xs, rep_ms):
    from triton.testing import do_bench

    def fwd():
        with torch.no_grad():
            fn(xs)

    def fwd_bwd():
        o = fn(xs)
        o.backward(do)
        for x in xs.values():
            x.grad = None

    with torch.no_grad():
        o = fn(xs)
    do = torch.randn_like(o)
    t_f = do_bench(fwd, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median")
    t_fb = do_bench(fwd_bwd, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return t_f, t_fb, peak, o


def copy_bandwidth():
    from triton.testing import do_bench

    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def run(args, save):
    """Measure every op and peer at every T; ``save(bw, rows)`` after each row, so a run
    cut short (FLA's first calls autotune for minutes) still leaves its results."""
    dev = torch.device("cuda")
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    rows = []
    for T in args.T:
        B = max(1, args.tokens // T)
        peers = [(op, "seqpar", seqpar_fn(op)) for op in args.ops]
        if "sdpa" in args.peers:
            peers.append(("softmax", "sdpa", sdpa_fn))
        if "fla" in args.peers and T in args.fla_T:
            peers += [(op, "fla", fla_fn) for op in args.ops if op in FLA]
        for op, impl, fn in peers:
            if impl == "fla":
                try:
                    fn = fla_fn(op)
                except Exception as e:  # not importable: record, go on
                    rows.append(dict(op=op, impl=impl, T=T, B=B, error=repr(e)[:300]))
                    continue
            xs = make_inputs("softmax_attn" if op == "softmax" else op, B, T, args.heads, args.dim, dev)
            row = dict(op=op, impl=impl, T=T, B=B, H=args.heads, D=args.dim, dtype="bfloat16")
            try:
                t0 = time.time()
                t_f, t_fb, peak, o = measure(fn, xs, args.rep_ms)
                fb_bytes = io_bytes(list(xs.values()), o)
                row.update(fwd_ms=t_f, fwd_bwd_ms=t_fb, fwd_tok_s=B * T / t_f * 1e3,
                           fwd_bwd_tok_s=B * T / t_fb * 1e3, peak_bytes=peak,
                           peak_bytes_per_token=peak / (B * T),
                           fwd_floor_ms=fb_bytes[0] / bw * 1e3, fwd_bwd_floor_ms=fb_bytes[1] / bw * 1e3,
                           seconds=time.time() - t0)
                row["fwd_over_floor"] = t_f / row["fwd_floor_ms"]
                row["fwd_bwd_over_floor"] = t_fb / row["fwd_bwd_floor_ms"]
                print(f"T={T:6d} {op:16s} {impl:6s} fwd {t_f:8.3f} ms  fwd+bwd {t_fb:8.3f} ms  "
                      f"x{row['fwd_bwd_over_floor']:.1f} floor  peak {peak / 2**20:8.0f} MiB", flush=True)
            except Exception as e:
                row["error"] = repr(e)[:300]
                print(f"T={T:6d} {op:16s} {impl:6s} ERROR {row['error']}", flush=True)
            rows.append(row)
            del xs
            torch.cuda.empty_cache()
            save(bw, rows)
    return bw, rows


def ratios(rows):
    """fwd+bwd time of every peer over seqpar's for the same op and T (> 1: seqpar faster)."""
    ours = {(r["op"], r["T"]): r for r in rows if r["impl"] == "seqpar" and "fwd_bwd_ms" in r}
    out = []
    for r in rows:
        if r["impl"] == "seqpar" or "fwd_bwd_ms" not in r:
            continue
        for (op, T), s in ours.items():
            if T == r["T"] and (op == r["op"] or r["impl"] == "sdpa"):
                out.append(dict(op=op, peer=r["impl"], T=T, speedup_fwd_bwd=r["fwd_bwd_ms"] / s["fwd_bwd_ms"]))
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for key in sorted({(r["op"], r["impl"]) for r in rows if "fwd_bwd_tok_s" in r}):
        pts = sorted((r["T"], r["fwd_bwd_tok_s"]) for r in rows
                     if (r["op"], r["impl"]) == key and "fwd_bwd_tok_s" in r)
        ax.plot(*zip(*pts), marker="o", linestyle="--" if key[1] != "seqpar" else "-",
                label=f"{key[0]} ({key[1]})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (B T = 32K tokens up to 32K, B = 1 beyond)")
    ax.set_ylabel("forward+backward tokens/s")
    ax.set_title(f"{torch.cuda.get_device_name()}: 16 heads x 128, bf16")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # plot() runs after every row


def main(argv=None):
    p = argparse.ArgumentParser(prog="seqpar bench ops", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 32768, 131072],
                   help="sequence lengths to time")
    p.add_argument("--tokens", type=int, default=32768,
                   help="tokens per call: B = tokens / T (B = 1 where T exceeds it)")
    p.add_argument("--heads", type=int, default=16, help="heads (queries and keys alike)")
    p.add_argument("--dim", type=int, default=128, help="head dim (K = V)")
    p.add_argument("--ops", nargs="+", default=OPS, choices=OPS, help="ops to time")
    p.add_argument("--peers", nargs="*", default=["sdpa", "fla"], choices=["sdpa", "fla"],
                   help="references timed beside them (none: seqpar alone)")
    p.add_argument("--fla-T", type=int, nargs="*", default=[8192],
                   help="T at which to run FLA (its first call autotunes for minutes)")
    p.add_argument("--rep-ms", type=int, default=100,
                   help="milliseconds of repetitions per timing (triton.testing.do_bench)")
    p.add_argument("--out", default="bench_ops",
                   help="path stem of the results: STEM.json and the plot STEM.png")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("seqpar bench ops: needs a CUDA GPU")
    versions = dict(torch=torch.__version__, triton=__import__("triton").__version__,
                    python=platform.python_version())
    try:
        import importlib.metadata as md
        versions["flash-linear-attention"] = md.version("flash-linear-attention")
    except Exception:
        versions["flash-linear-attention"] = None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(bw, rows):
        out.with_suffix(".json").write_text(json.dumps(dict(
            command="seqpar bench ops " + " ".join(argv or []), gpu=torch.cuda.get_device_name(),
            versions=versions, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            copy_bandwidth_bytes_per_s=bw, rows=rows, speedups=ratios(rows)), indent=1))
        plot(rows, out.with_suffix(".png"))

    bw, rows = run(args, save)
    rat = ratios(rows)
    for r in rat:
        print(f"T={r['T']:6d} {r['op']:16s} vs {r['peer']:5s}: seqpar fwd+bwd {r['speedup_fwd_bwd']:.2f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
