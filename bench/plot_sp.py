"""Plots and a summary of the sequence-parallel benchmarks (issue 6 and 7).

    python bench/plot_sp.py --dir OUT [--summary OUT/summary.md]
    python bench/plot_sp.py --sp a.json b.json ... --model-png sp_model.png

Reads what ``bench/device/sp_x2.sh`` writes: ``sp.json`` (``seqpar bench sp``),
``train.json`` and ``longest.json`` (``python -m seqpar.bench.longest``), any of them may
be missing. Writes ``sp.png`` (weak-scaling overhead, strong-scaling efficiency,
communication time and bytes per rank, per mixer and strategy), ``sp_model.png`` (the
step-time model against P below) and a Markdown summary.

The step-time model (weak scaling, T per device fixed), per mixer and strategy:
``t(P) = compute + a (P - 1) + bytes(P) / beta`` where ``compute`` is the measured
compute-only time of the SP call, ``bytes(P)`` the closed-form bytes per rank (the scan:
one state each way, whatever P; all-gather: P - 1 of them), ``a`` the per-hop cost (the
scan's chain has P - 1 hops; a ring all-gather P - 1 steps) and ``beta`` the link
bandwidth. With measurements at several P, ``a`` and ``1 / beta`` are fitted (least
squares, non-negative); with one P, ``beta`` is ``--beta`` (an assumption, printed on the
plot) and ``a`` takes the rest of the measured communication time. Efficiency is
``baseline(1 device at T) / t(P)``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from seqpar.bench.sp import LINEAR, expected_linear_bytes  # noqa: E402


def _load(path: Path):
    return json.loads(path.read_text()) if path and path.exists() else None


def _label(r: dict) -> str:
    return r["impl"] + ":" + r["strategy"] + "/" + r["layout"] if r["impl"] != "seqpar" else \
        r["strategy"] + "/" + r["layout"]


def _rows(sp: dict, mode: str) -> list[dict]:
    return [r for r in sp["results"] if r["mode"] == mode and "error" not in r]


def _bars(ax, rows, value, ylabel, log=False):
    mixers = list(dict.fromkeys(r["mixer"] for r in rows))
    labels = list(dict.fromkeys(_label(r) for r in rows))
    width = 0.8 / max(len(labels), 1)
    for j, lab in enumerate(labels):
        xs, ys = [], []
        for i, m in enumerate(mixers):
            for r in rows:
                if r["mixer"] == m and _label(r) == lab and value(r) is not None:
                    xs.append(i + (j - (len(labels) - 1) / 2) * width)
                    ys.append(value(r))
        ax.bar(xs, ys, width, label=lab)
    ax.set_xticks(range(len(mixers)), mixers, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)


def plot_sp(sp: dict, path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    P = sp["world_size"]
    weak, strong = _rows(sp, "weak"), _rows(sp, "strong")
    _bars(axes[0, 0], weak, lambda r: 100 * r["weak_overhead"] if "weak_overhead" in r else None,
          f"weak-scaling overhead, % ({P} devices at {P}T vs 1 at T)")
    axes[0, 0].axhline(5, color="k", lw=0.8, ls="--")
    axes[0, 0].set_title(f"weak: T = {sp['seq_per_gpu']} per device")
    _bars(axes[0, 1], strong, lambda r: r.get("efficiency"),
          f"strong-scaling efficiency (speedup / {P})")
    axes[0, 1].axhline(1, color="k", lw=0.8, ls="--")
    axes[0, 1].set_title(f"strong: total T = {sp['seq_total']}")
    _bars(axes[1, 0], weak, lambda r: r.get("comm_ms"), "communication time, ms (weak)")
    axes[1, 0].set_title("ms - compute-only ms (collectives stubbed)")
    _bars(axes[1, 1], weak, lambda r: max(r["bytes_per_rank"]) if r.get("bytes_per_rank") else None,
          "bytes sent per rank, fwd+bwd (weak)", log=True)
    axes[0, 0].legend(fontsize=7, ncol=2)
    gpu = (sp.get("gpus") or ["CPU"])[0]
    fig.suptitle(f"seqpar bench sp: {P} x {gpu}, {sp['heads']} heads x {sp['head_dim']}, "
                 f"{sp['dtype']}, torch {sp['torch']}, triton {sp.get('triton')}, {sp['date']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the model ----

def _lstsq_nonneg(rows: list[tuple[float, float, float]]):
    """Fit y = a x1 + c x2 with a, c >= 0 (two unknowns: try the full fit, then each alone)."""
    best = None
    for use in ((1, 1), (1, 0), (0, 1)):
        A = np.array([[x1 * use[0], x2 * use[1]] for x1, x2, _ in rows])
        y = np.array([r[2] for r in rows])
        sol = np.linalg.lstsq(A, y, rcond=None)[0] * np.array(use)
        if (sol >= 0).all():
            err = float(((A @ sol - y) ** 2).sum())
            if best is None or err < best[0]:
                best = (err, float(sol[0]), float(sol[1]))
    return (best[1], best[2]) if best else (0.0, 0.0)


def model(sps: list[dict], beta: float):
    """Per (mixer, strategy): the fitted model and the measured points (contiguous, weak)."""
    groups: dict = {}
    for sp in sps:
        for r in _rows(sp, "weak"):
            if r["mixer"] in LINEAR and r["layout"] == "contiguous" and r["impl"] == "seqpar":
                groups.setdefault((r["mixer"], r["strategy"]), []).append((sp, r))
    fits = {}
    for (mixer, strategy), pts in groups.items():
        obs = [(r["world_size"] - 1, max(r["bytes_per_rank"]), max(r["comm_ms"], 0.0)) for _, r in pts]
        if len({o[0] for o in obs}) >= 2:
            a, inv_beta_ms = _lstsq_nonneg(obs)
            how = "fitted"
        else:
            inv_beta_ms = 1e3 / beta
            a = max(0.0, sum(c - b * inv_beta_ms for _, b, c in obs) / sum(h for h, _, _ in obs))
            how = f"beta = {beta / 1e9:.0f} GB/s assumed"
        sp0, r0 = max(pts, key=lambda p: p[1]["world_size"])
        B, H, D = sp0["batch"], sp0["heads"], sp0["head_dim"]
        fits[(mixer, strategy)] = {
            "a_ms": a, "inv_beta_ms_per_byte": inv_beta_ms, "how": how,
            "compute_ms": r0["compute_ms"], "baseline_ms": r0["baseline_ms"],
            "bytes": lambda P, m=mixer, s=strategy, B=B, H=H, D=D: max(
                expected_linear_bytes(m, s, "contiguous", P, q, B, H, D, D) for q in range(P)),
            "points": [(r["world_size"], r["baseline_ms"] / r["ms"]) for _, r in pts]}
    return fits


def predicted_efficiency(fit: dict, P: int) -> float:
    if P == 1:
        return 1.0
    t = fit["compute_ms"] + fit["a_ms"] * (P - 1) + fit["bytes"](P) * fit["inv_beta_ms_per_byte"]
    return fit["baseline_ms"] / t


def plot_model(sps: list[dict], path: Path, beta: float) -> dict:
    fits = model(sps, beta)
    mixers = [m for m in LINEAR if any(k[0] == m for k in fits)]
    Ps = [1, 2, 4, 8, 16, 32, 64]
    cols = min(3, max(len(mixers), 1))
    rows = -(-max(len(mixers), 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows + 0.6), sharey=True,
                             squeeze=False)
    for ax in axes.flat[len(mixers):]:
        ax.set_visible(False)
    for ax, mixer in zip(axes.flat, mixers):
        for strategy, color in (("scan", "C0"), ("allgather", "C1")):
            fit = fits.get((mixer, strategy))
            if fit is None:
                continue
            ax.plot(Ps, [predicted_efficiency(fit, P) for P in Ps], color=color, label=f"{strategy} model")
            pts = sorted(fit["points"])
            ax.plot([1] + [p for p, _ in pts], [1.0] + [e for _, e in pts], "o", color=color,
                    label=f"{strategy} measured")
        ax.axhline(0.9, color="k", lw=0.7, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(mixer, fontsize=9)
        ax.set_xlabel("P (devices)")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("efficiency t(1) / t(P)")
    axes[0][0].legend(fontsize=7)
    src = sorted({(sp.get("gpus") or ["CPU (gloo)"])[0] for sp in sps})
    hows = sorted({f["how"] for f in fits.values()})
    fig.suptitle(f"weak scaling, step-time model t(P) = compute + a (P-1) + bytes(P)/beta\n"
                 f"from {', '.join(src)}, T = {sps[0]['seq_per_gpu']} per device, P measured: "
                 f"{sorted({sp['world_size'] for sp in sps})}; {'; '.join(hows)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fits


# ---- summary ----

def _tok(T: int) -> str:
    return f"{T // 1024}K" if T >= 1024 and T % 1024 == 0 else str(T)


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def summary(sp, train, longest) -> str:
    lines = []
    if sp:
        gpu = (sp.get("gpus") or ["CPU"])[0]
        lines += [f"## seqpar bench sp: {sp['world_size']} x {gpu}, {sp['date']}, torch {sp['torch']}, "
                  f"triton {sp.get('triton')}, complete: {sp.get('complete')}", "",
                  f"`{sp['command']}`", ""]
        for mode in ("weak", "strong"):
            rows = [r for r in sp["results"] if r["mode"] == mode]
            if not rows:
                continue
            key = "weak_overhead" if mode == "weak" else "strong_speedup"
            lines += [f"### {mode} scaling", "",
                      f"| mixer | strategy | T/device | 1 device ms | SP ms | {key} | comm ms | MB/rank | rel err |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                if "error" in r:
                    lines.append(f"| {r['mixer']} | {_label(r)} | {r['seq_per_gpu']} | | | error: "
                                 f"{r['error'][:120]} | | | |")
                    continue
                v = r.get(key)
                v = "-" if v is None else (f"{100 * v:+.1f}%" if mode == "weak" else f"{v:.2f}x")
                mb = max(r["bytes_per_rank"]) / 1e6 if r.get("bytes_per_rank") else None
                lines.append(f"| {r['mixer']} | {_label(r)} | {r['seq_per_gpu']} | {_fmt(r['baseline_ms'])} | "
                             f"{_fmt(r['ms'])} | {v} | {_fmt(r['comm_ms'])} | {_fmt(mb)} | "
                             f"{_fmt(r.get('max_rel_err'), '.1e')} |")
            lines.append("")
        verdicts = []
        for m in LINEAR:
            best = [r["weak_overhead"] for r in sp["results"] if r["mixer"] == m and r["mode"] == "weak"
                    and r["layout"] == "contiguous" and "weak_overhead" in r]
            if best:
                verdicts.append(f"{m} {100 * min(best):+.1f}% {'PASS' if min(best) <= 0.05 else 'FAIL'}")
        checked = [r for r in sp["results"] if "expected_bytes_per_rank" in r and "bytes_by_op" in r]
        if checked:
            same = sum(1 for r in checked if r["expected_bytes_per_rank"] == [
                sum(v for k, v in d.items() if k.startswith("linear")) for d in r["bytes_by_op"]])
            lines += [f"Linear-family bytes per rank equal to the closed form in {same} of "
                      f"{len(checked)} rows.", ""]
        errs = [r["max_rel_err"] for r in sp["results"] if "max_rel_err" in r]
        if errs:
            lines += [f"Largest relative L2 error of an SP result against the single-device op: "
                      f"{max(errs):.1e} ({len(errs)} rows).", ""]
        if verdicts:
            lines += ["Weak-scaling overhead, best of scan/allgather (contiguous), target <= 5%: "
                      + "; ".join(verdicts), ""]
        if sp.get("skipped"):
            lines += ["Skipped / notes:", *[f"- {s[:300]}" for s in sp["skipped"]], ""]
    if train:
        lines += ["## training throughput", "", "| GPUs | T | AC | tokens/s | step s | MFU | peak GB |",
                  "|---|---|---|---|---|---|---|"]
        for r in train.get("runs", []):
            if "error" in r:
                lines.append(f"| {r['world']} | {r['seq_len']} | {r['activation_checkpointing']} "
                             f"| error: {r['error'][:100]} | | | |")
                continue
            mfu = r.get("mfu")
            lines.append(f"| {r['world']} | {r['seq_len']} | {r['activation_checkpointing']} | "
                         f"{r['tokens_per_s']:.0f} | {r['step_s']:.3f} | "
                         f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
                         f"{_fmt(r.get('peak_allocated_gb'), '.1f')} |")
        lines.append("")
    if longest:
        lines += ["## longest trainable context (batch 1)", "",
                  "| GPUs | trained | peak GB there | smallest failed | time-bounded | attempts |",
                  "|---|---|---|---|---|---|"]
        got = {}
        for key in sorted(longest):
            r = longest[key]
            got[r["nproc"]] = r["longest_ok"]
            tries = ", ".join(f"{_tok(a['T'])} {a['status']}" for a in r["attempts"] if a["rank"] == 0
                              or a["status"] != "ok")
            peak = max((a.get("peak_reserved_gb", 0.0) for a in r["attempts"]
                        if a["T"] == r["longest_ok"] and a["status"] == "ok"), default=None)
            lines.append(f"| {r['nproc']} | {r['longest_ok']} | {_fmt(peak, '.1f')} | "
                         f"{r['smallest_failed']} | {r['time_bounded']} | {tries} |")
        if got.get(1) and got.get(2):
            lines.append(f"\n2 GPUs / 1 GPU: {got[2] / got[1]:.2f}x (target >= 1.8x); 2 GPUs >= 1M: "
                         f"{got[2] >= 1 << 20}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=None, help="folder with sp.json, train.json, longest.json")
    p.add_argument("--sp", type=Path, nargs="*", default=[], help="sp JSON files for the model")
    p.add_argument("--model-png", type=Path, default=None)
    p.add_argument("--summary", type=Path, default=None)
    p.add_argument("--beta", type=float, default=300e9,
                   help="link bandwidth (bytes/s) assumed by the model when P was measured once")
    args = p.parse_args(argv)
    sp = train = longest = None
    sps = [_load(x) for x in args.sp]
    if args.dir is not None:
        sp, train, longest = (_load(args.dir / n) for n in ("sp.json", "train.json", "longest.json"))
        if sp is not None:
            plot_sp(sp, args.dir / "sp.png")
            sps = sps or [sp]
    if sps:
        plot_model(sps, args.model_png or (args.dir or Path(".")) / "sp_model.png", args.beta)
    text = summary(sp, train, longest) if args.dir is not None else "\n".join(
        summary(x, None, None) for x in sps)
    if args.summary is not None:
        args.summary.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
