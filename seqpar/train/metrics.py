"""What a run reports: the progress bar, ``metrics.jsonl`` (and TensorBoard when it is
installed), the loss-curve PNG, MFU and memory. Only rank 0 writes."""
from __future__ import annotations

import json
import resource
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Dense bf16 tensor-core peak FLOP/s per GPU (vendor data sheets), matched by substring of
# torch.cuda.get_device_name(); more specific names first.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
)


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of one device, or None (CPU, unknown GPU): MFU is then 'n/a'."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS if k in name), None)


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process in GB: allocated CUDA memory on GPU, resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def format_mfu(mfu: float | None) -> str:
    return "n/a" if mfu is None else f"{100 * mfu:.1f}%"


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


class Reporter:
    """Rank 0's sink for metrics; every method is a no-op on other ranks.

    ``metrics.jsonl`` holds one JSON object per record: ``{"step", "loss", "lr",
    "grad_norm", "tokens", "tokens_per_s", "mfu", "memory_gb"}`` for training (``loss``
    is the mean over the steps since the previous record; ``grad_norm`` and ``lr`` are
    the record's step's; ``mfu`` is None where the peak is unknown) and ``{"step",
    "eval_loss"}`` for evaluation. Resuming at step ``s`` keeps the records up
    to ``s`` and appends.
    """

    def __init__(self, out: Path, *, active: bool, total_steps: int, start_step: int,
                 progress: bool):
        self.active = active
        self.out = out
        self.console = Console(stderr=True)
        self._progress = None
        self._tb = None
        if not active:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        kept = [r for r in self.records() if r["step"] <= start_step] if start_step else []
        with self.path.open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._tb = _tensorboard(out)
        if progress and self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console)
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step,
                                                 info="")
            self._progress.start()

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def log(self, record: dict) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])

    def print(self, text: str) -> None:
        if self.active:
            self.console.print(text, highlight=False, soft_wrap=True)

    def advance(self, step: int, info: str, line: bool) -> None:
        """Move the bar to ``step`` with ``info``; without a bar, print ``info`` when
        ``line`` (a log step)."""
        if not self.active:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
        elif line:
            self.print(f"step {step}: {info}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()

    def plot(self) -> Path | None:
        """``loss.png``: training loss (and evaluation loss) against step."""
        if not self.active:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recs = self.records()
        train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval (held-out documents)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        ax.set_title(self.out.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.out / "loss.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
