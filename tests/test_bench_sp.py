"""``seqpar bench sp`` and the long-context search, on CPU (budget: under 40 s).

* The closed forms of bytes per rank (issue 7: all-gather moves P - 1 states per rank,
  the scan about one, whatever P) against a hand count.
* The local communicator stands in for a group without one, and ``--simulate`` times
  one rank's compute on one device for every op, strategy and layout.
* The longest-context search on a synthetic memory/time model: doubling, the jump to the
  memory model's limit, bisection after an out-of-memory, the time cut.
* One 2-rank gloo run of the benchmark under torchrun at tiny sizes: every row present,
  SP results equal the single-device op, bytes equal the closed form, and the report
  script turns the JSON into plots and a summary.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from seqpar.bench.longest import fit_in_time, next_size
from seqpar.bench.sp import LINEAR, expected_linear_bytes

ROOT = Path(__file__).resolve().parents[1]
K = 1024


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_closed_form_bytes(world, layout):
    B, H, D = 1, 2, 8
    state = B * H * D * D * 4
    per_chunk = 2 if layout == "zigzag" else 1
    for r in range(world):
        scan = expected_linear_bytes("linear_attn", "scan", layout, world, r, B, H, D, D)
        # One state forward unless last in the chain, one backward unless first; zigzag
        # ranks hold two chunks, both links of which cross ranks except at the fold.
        hops = (r < world - 1) + (r > 0)
        assert scan == hops * per_chunk * state
        ag = expected_linear_bytes("linear_attn", "allgather", layout, world, r, B, H, D, D)
        assert ag == (world - 1) * per_chunk * (B * H * 4 + 2 * state)
        delta = expected_linear_bytes("delta_rule", "allgather", layout, world, r, B, H, D, D)
        assert delta == (world - 1) * per_chunk * 3 * state  # K x K transition, state, gradient
    mlstm = expected_linear_bytes("mlstm", "scan", "contiguous", world, 1, B, H, D, D)
    hops = (1 < world - 1) + 1
    assert mlstm == hops * B * H * D * (D + 1) * 4  # the normalizer rides as an extra column


def test_local_communicator_stands_in_without_a_group():
    """LocalCommunicator: buffers of the right shapes, received states zeroed, bytes
    counted as a real group would count them, and no process group touched."""
    import torch

    from seqpar.parallel import LocalCommunicator

    comm = LocalCommunicator(4, 1)
    t = torch.ones(3, 2)
    buf = torch.full((3, 2), 7.0)
    comm.send_recv([(t, 2)], [(buf, 0)], "x").wait()
    assert buf.abs().sum() == 0 and comm.bytes_by_op["x"] == t.numel() * 4
    got = comm.all_gather(t, "y")
    assert got.shape == (4, 3, 2) and all(torch.equal(g, t) for g in got)
    assert comm.bytes_by_op["y"] == 3 * t.numel() * 4
    assert comm.gather_ints([5, 6]) == [[5, 6]] * 4
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="rank"):
        LocalCommunicator(2, 2)


def test_bench_sp_simulate_cpu(tmp_path):
    """``seqpar bench sp --simulate`` on CPU at small shapes: every op, strategy and layout,
    ranks 0, 1 and P-1, each beside the op without SP, with versions and device."""
    from seqpar.bench.sp import main

    out = tmp_path / "sim.json"
    assert main(["--simulate", "2,4", "--device", "cpu", "--small", "--t-local", "32",
                 "--heads", "4", "--head-dim", "16", "--reps", "1", "--warmup", "0",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["complete"] and data["torch"] and data["device"] == "cpu"
    rows = data["rows"]
    assert not [r for r in rows if "error" in r]
    keys = {(r["op"], r["strategy"], r["layout"], r["world"], r["rank"]) for r in rows}
    for op in LINEAR:
        for strategy in ("scan", "allgather"):
            for layout in ("contiguous", "zigzag"):
                assert {(op, strategy, layout, 2, r) for r in (0, 1)} <= keys
                assert {(op, strategy, layout, 4, r) for r in (0, 1, 3)} <= keys
    assert {r["op"] for r in rows} == set(LINEAR) | {"softmax_attn"}
    for r in rows:
        assert r["T_local"] == 32 and r["base_ms"] > 0 and r["sp_ms"] > 0
        assert abs(r["ratio"] - r["sp_ms"] / r["base_ms"]) < 1e-9


def _simulate(capacity, mem, secs, budget=1e9, known=True):
    """Run the search loop against a fake device of ``capacity`` GB (told to the search
    when ``known``); returns [(T, status)]."""
    records, out = [], []
    for _ in range(30):
        T = next_size(records, 32 * K, 16 * K * K, 32 * K, capacity if known else None)
        if T is None:
            return out
        oks = [r for r in records if r["status"] == "ok"]
        T, _ = fit_in_time(oks, T, budget - sum(r.get("seconds", 0) for r in records), 32 * K)
        if T is None:
            return out + [("time", None)]
        status = "ok" if mem(T) < capacity else "oom"
        records.append({"T": T, "rank": 0, "status": status, "seconds": secs(T),
                        "peak_reserved_gb": mem(T)})
        out.append((T, status))
    raise AssertionError("search did not end")


def test_search_brackets_the_limit():
    def mem(T):
        return 20 + 0.12 * T / K  # GB: fixed part plus activations linear in T

    limit = (141 - 20) / 0.12 * K
    out = _simulate(141.0, mem, lambda T: 1e-5 * T + 2e-11 * T * T)
    sizes = [T for T, _ in out]
    assert sizes[:5] == [32 * K, 64 * K, 128 * K, 256 * K, 512 * K]  # doubling
    best = max(T for T, s in out if s == "ok")
    worst = min(T for T, s in out if s == "oom")
    assert best < limit < worst and worst - best <= max(32 * K, best // 8)
    assert sum(s == "oom" for _, s in out) <= 2  # the memory model avoids blind doubling


def test_search_without_memory_model_bisects_and_stops_on_time():
    out = _simulate(1.0, lambda T: 0.0 if T <= 300 * K else 2.0, lambda T: T / K / 100, known=False)
    # No capacity: doubling to 512K (out of memory), then bisection down to 1/8.
    oks = [T for T, s in out if s == "ok"]
    assert 256 * K <= max(oks) <= 300 * K and ("oom" in dict(out).values())
    cut = _simulate(141.0, lambda T: 1.0, lambda T: 1e-4 * T, budget=60)
    assert cut[-1] == ("time", None) and max(T for T, _ in cut[:-1]) * 1e-4 < 60


@pytest.mark.dist
def test_bench_sp_gloo_smoke(tmp_path):
    out = tmp_path / "sp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "seqpar.bench.sp", "--device", "cpu", "--small",
           "--mixers", "linear_attn,gated_delta_rule,softmax_attn", "--layouts", "contiguous",
           "--seq-total", "128", "--reps", "1", "--warmup", "0", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["complete"] and data["world_size"] == 2 and data["torch"]
    rows = [r for r in data["results"] if r["mode"] == "weak"]
    strong = [r for r in data["results"] if r["mode"] == "strong"]
    # Total 128 = 2 x 64: the strong rows reuse the weak runs against a 128-token baseline.
    assert [(r["mixer"], r["strategy"], r["ms"]) for r in strong] == \
        [(r["mixer"], r["strategy"], r["ms"]) for r in rows]
    assert all(r["same_run_as_weak"] and r["strong_speedup"] > 0 for r in strong)
    got = {(r["mixer"], r["strategy"]) for r in rows}
    assert got == {("linear_attn", "scan"), ("linear_attn", "allgather"),
                   ("gated_delta_rule", "scan"), ("gated_delta_rule", "allgather"),
                   ("softmax_attn", "ring"), ("softmax_attn", "alltoall"),
                   ("softmax_attn", "allgather")}
    for r in rows:
        assert "error" not in r, r
        assert r["max_rel_err"] < 1e-4, r
        assert r["ms"] > 0 and r["compute_ms"] > 0 and r["baseline_ms"] > 0
        assert len(r["bytes_per_rank"]) == 2 and min(r["bytes_per_rank"]) > 0
        if r["mixer"] in LINEAR:
            sent = [sum(v for k, v in d.items() if k.startswith("linear")) for d in r["bytes_by_op"]]
            assert sent == r["expected_bytes_per_rank"], r
    spec = importlib.util.spec_from_file_location("plot_sp", ROOT / "bench" / "plot_sp.py")
    plot_sp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_sp)
    assert plot_sp.main(["--dir", str(tmp_path), "--summary", str(tmp_path / "summary.md")]) == 0
    assert (tmp_path / "sp.png").stat().st_size > 0 and (tmp_path / "sp_model.png").stat().st_size > 0
    assert "gated_delta_rule" in (tmp_path / "summary.md").read_text()
