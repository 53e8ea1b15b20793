"""Compiled blocks on the GPU (issue 15): does ``HybridLM.compile_blocks`` (inductor,
regional) build and train every mixer, and what does it gain on the 125m preset?

    python bench/device/compile_check.py mixers OUT_DIR [gdn,attn]  # compiled == eager?
    python bench/device/compile_check.py speed OUT_DIR    # 125m: eager vs compiled tokens/s

``mixers`` builds, for each name of ``seqpar.layers.MIXERS``, a 2-layer model of that
mixer (d_model 256, 4 heads of 64, the default backend: Triton on CUDA) and runs two
training steps' forward and backward under bf16 autocast on packed documents (the
document count marked dynamic, as the trainer does; the second packing has another
count and must reuse the graphs), then one step on a plain (B, T) batch, each beside the
same model uncompiled (a comma-separated list after OUT_DIR checks only those mixers).
A failure prints its full traceback and stores it in the JSON. The mixers run from the
125m preset's (gdn, attn) on; the JSON is rewritten after each.

``speed`` runs ``seqpar bench train`` on the 125m preset (seq 4096, 4 sequences packed per
step, no reference model) with ``--no-compile`` and with ``--compile``.

Without CUDA both run on the CPU at toy sizes (d_model 32, 64 tokens; the tiny preset),
which checks the script, not the GPU.

Results: ``OUT_DIR/compile_mixers.json``, ``OUT_DIR/compile_speed.json`` (and the two
``bench train`` files it summarizes).
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch

from seqpar.bench.sp import environment, write_json
from seqpar.layers import MIXERS
from seqpar.models import HybridLM, ModelConfig

FIRST = ("gdn", "attn")  # the 125m preset's mixers first: they matter most


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _step(model, ids, targets, cu):
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        loss = model.loss(ids, targets, cu_seqlens=cu, check_ids=False)[0]
    loss.backward()
    return loss.detach().float(), [p.grad for p in model.parameters()]


def check_mixer(name: str, dev: torch.device) -> dict:
    """Compile one mixer's blocks; compare three steps with the eager model."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    gpu = dev.type == "cuda"
    cfg = ModelConfig(vocab_size=256, d_model=256 if gpu else 32, n_layers=2, n_heads=4,
                      head_dim=64 if gpu else 8, pattern=name, max_seq_len=4096)
    eager = HybridLM(cfg).to(dev)
    compiled = HybridLM(cfg).to(dev)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    T = 2048 if gpu else 64
    ids = torch.randint(0, 256, (1, T), device=dev)
    targets = torch.randint(0, 256, (1, T), device=dev)
    row = {"mixer": name, "steps": []}
    t0 = time.perf_counter()
    packings = ([300, 1100, 1500], [17, 700, 701, 1300, 1999]) if gpu else ([9, 30], [1, 2, 40, 41])
    for cuts in (*packings, None):
        if cuts is None:
            cu, x, y = None, ids.view(4, T // 4), targets.view(4, T // 4)
        else:
            cu = torch.tensor([0, *cuts, T], dtype=torch.int32, device=dev)
            torch._dynamo.maybe_mark_dynamic(cu, 0)
            x, y = ids, targets
        le, ge = _step(eager, x, y, cu)
        lc, gc = _step(compiled, x, y, cu)
        if gpu:
            torch.cuda.synchronize()
        row["steps"].append({
            "packed_documents": None if cuts is None else len(cuts) + 1,
            "loss_eager": le.item(), "loss_compiled": lc.item(),
            "max_grad_rel_err": max(_rel(c, e) for c, e in zip(gc, ge)),
            "unique_graphs": counters["stats"]["unique_graphs"],
            "elapsed_s": time.perf_counter() - t0})
    s = row["steps"]
    row["reused_graphs_across_packings"] = s[1]["unique_graphs"] == s[0]["unique_graphs"]
    row["ok"] = all(abs(r["loss_compiled"] - r["loss_eager"]) <= 1e-2 * abs(r["loss_eager"])
                    and r["max_grad_rel_err"] < 5e-2 for r in s)
    return row


def mixers(out: Path, only: str | None = None) -> int:
    dev = _device()
    names = [*FIRST, *(n for n in MIXERS if n not in FIRST)]
    if only is not None:
        names = [n for n in names if n in only.split(",")]
    result = {"check": "compile_blocks per mixer (bench/device/compile_check.py mixers)",
              **environment(dev, 1), "rows": []}
    failed = 0
    for name in names:
        print(f"== {name}", flush=True)
        try:
            row = check_mixer(name, dev)
        except Exception as e:  # noqa: BLE001 - every failure is recorded with its traceback
            tb = traceback.format_exc()
            print(tb, flush=True)
            row = {"mixer": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
                   "traceback": tb}
        failed += not row["ok"]
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        result["rows"].append(row)
        write_json(out / "compile_mixers.json", result)
    print(f"compile OK: {len(names) - failed} of {len(names)} mixers", flush=True)
    return 1 if failed else 0


def speed(out: Path) -> int:
    from seqpar.bench.train import main as bench_train

    dev = _device()
    shape = (["--preset", "125m", "--seq-len", "4096", "--batch-size", "4", "--warmup", "3",
              "--steps", "10"] if dev.type == "cuda" else
             ["--preset", "tiny", "--seq-len", "64", "--batch-size", "2", "--warmup", "1",
              "--steps", "2"])
    rows = {}
    for flag in ("--no-compile", "--compile"):
        path = out / f"compile_speed_train{flag.replace('--', '_')}.json"
        argv = [*shape, "--reference", "none", flag, "--out", str(path)]
        print("== seqpar bench train " + " ".join(argv), flush=True)
        try:
            rc = bench_train(argv)
            run = json.loads(path.read_text())["runs"][0]
            rows[flag] = {"rc": rc, **{k: run.get(k) for k in (
                "compile", "tokens_per_s", "step_s", "mfu", "warmup_s", "peak_allocated_gb",
                "syncs_per_step", "losses", "error")}}
        except Exception as e:  # noqa: BLE001
            tb = traceback.format_exc()
            print(tb, flush=True)
            rows[flag] = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": tb}
    e, c = rows["--no-compile"], rows["--compile"]
    ratio = (c["tokens_per_s"] / e["tokens_per_s"]
             if c.get("tokens_per_s") and e.get("tokens_per_s") else None)
    write_json(out / "compile_speed.json", {
        "check": "125m eager vs compiled (bench/device/compile_check.py speed)",
        **environment(dev, 1), "argv": shape, "eager": e, "compiled": c,
        "compiled_over_eager_tokens_per_s": ratio})
    print(f"tokens/s: eager {e.get('tokens_per_s')}, compiled {c.get('tokens_per_s')}, "
          f"ratio {ratio}", flush=True)
    return 0 if ratio is not None else 1


def main(argv: list[str]) -> int:
    if not 2 <= len(argv) <= 3 or argv[0] not in ("mixers", "speed") or (
            len(argv) == 3 and argv[0] != "mixers"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    return mixers(out, *argv[2:]) if argv[0] == "mixers" else speed(out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
