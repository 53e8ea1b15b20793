"""The training loop: model, FSDP2, optimizer and schedule (:class:`Trainer`), and the
whole run (:func:`run`)."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from pathlib import Path

import torch
from torch.distributed._composable import checkpoint as activation_checkpoint
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from ..models import HybridLM, ModelConfig, check_token_ids
from ..ops.validate import remember_offsets
from ..parallel import SequenceParallel, shard
from . import checkpoint
from .config import ConfigError, TrainConfig, resolve
from .data import (
    IGNORE_INDEX,
    Batch,
    Loader,
    WindowSampler,
    load_documents,
    load_tokenizer,
    split_documents,
    split_names,
    token_stream,
)
from .distributed import DistEnv, setup, teardown
from .metrics import Reporter, format_mfu, memory_gb, peak_flops

# The embedding and LM head are padded to a multiple of this many tokens (tensor-core
# friendly shapes); the extra logits are never targets and learn to stay low.
VOCAB_MULTIPLE = 64


def lr_factor(step: int, *, warmup: int, steps: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay from 1 to ``min_ratio`` at
    ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _sequence_parallel(env: DistEnv, cfg: TrainConfig):
    if env.sp == 1:
        return None
    return SequenceParallel(env.sp_group, strategy=cfg.sp_strategy, layout=cfg.sp_layout)


class Trainer:
    """Model, optimizer and schedule of one rank.

    The model is built whole from ``cfg.seed`` on every rank (identical replicas), then,
    when distributed, each block and the root are sharded with FSDP2 over all ranks.
    Gradients are *summed* over ranks (FSDP's default averages), because every rank's
    loss is already its share of the global mean: ``sum of its token losses / token
    count of the whole global batch``. Summed over data and sequence ranks this is
    exactly the single-device loss of the global batch, whatever the number of ignored
    targets on each rank.

    Speed: every block is compiled (``cfg.compile``; None: on CUDA only); the optimizer is
    AdamW's fused kernel on CUDA; in bf16, FSDP2 keeps float32 master weights and
    gathers bfloat16 copies (``MixedPrecisionPolicy``), and on one device autocast casts
    them per matmul; the loss never forms whole float32 logits
    (``HybridLM.loss``). A step makes no host synchronization: batches go to the GPU
    from pinned memory without blocking, their ids are checked on the host before,
    their packed offsets are handed to the ops from the host copy, and the loss and
    gradient norm come back as device tensors (read only at log steps).
    """

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        torch.manual_seed(cfg.seed)
        model = HybridLM(model_cfg).to(env.device)
        self.flops_per_token = model.flops_per_token(cfg.seq_len)
        self.num_params = model.num_params()
        use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and env.device.type == "cuda")
        # On CUDA unless turned off; on CPU only when asked (inductor builds C++ code for
        # every mixer type before the first step).
        self.compiled = cfg.compile if cfg.compile is not None else env.device.type == "cuda"
        if cfg.activation_checkpointing:
            for block in model.blocks:
                activation_checkpoint(block)
        if self.compiled:
            model.compile_blocks()
        if env.distributed:
            mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if use_bf16 else MixedPrecisionPolicy())
            for block in model.blocks:
                fully_shard(block, mesh=env.fsdp_mesh, mp_policy=mp)
            fully_shard(model, mesh=env.fsdp_mesh, mp_policy=mp)
            register_fsdp_forward_method(model, "loss")
            for m in model.modules():
                if isinstance(m, FSDPModule):
                    m.set_gradient_divide_factor(1.0)
                    # A plain SUM (no pre-multiplied sum), which Gloo also supports.
                    m.set_force_sum_reduction_for_comms(True)
        self.model = model
        self.sp = _sequence_parallel(env, cfg)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas, fused=env.device.type == "cuda" or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup=cfg.warmup, steps=cfg.steps,
                                                min_ratio=cfg.min_lr_ratio))
        self._autocast = (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)) if use_bf16 \
            else contextlib.nullcontext

    def to_device(self, batch: Batch) -> Batch:
        """A host batch on this rank's device without blocking the host.

        The ids are checked against the vocabulary here, on the host; on CUDA the
        tensors go through pinned memory as asynchronous copies, and the host values of
        ``cu_seqlens`` are registered for the ops (``remember_offsets``), which would
        otherwise read them back from the GPU."""
        check_token_ids("input_ids", batch.input_ids, self.model.config.vocab_size)
        if self.env.device.type == "cuda":
            def move(x):
                return x.pin_memory().to(self.env.device, non_blocking=True)

            cu = None
            if batch.cu_seqlens is not None:
                cu = move(batch.cu_seqlens)
                remember_offsets(cu, batch.cu_seqlens.tolist())
            batch = Batch(move(batch.input_ids), move(batch.targets), cu)
        else:
            batch = batch.to(self.env.device)
            if batch.cu_seqlens is not None:
                remember_offsets(batch.cu_seqlens, batch.cu_seqlens.tolist())
        if self.compiled and batch.cu_seqlens is not None:
            # The number of documents varies by batch: one graph for all of them.
            torch._dynamo.maybe_mark_dynamic(batch.cu_seqlens, 0)
        return batch

    def shard(self, batch: Batch) -> Batch:
        """This rank's SP shard of a data-parallel rank's whole batch (itself without SP)."""
        if self.sp is None:
            return batch
        return Batch(shard(batch.input_ids, self.sp), shard(batch.targets, self.sp), batch.cu_seqlens)

    def _loss_sum(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed token loss (float32) and target count of this rank's shard of ``batch``."""
        batch = self.shard(batch)
        with self._autocast():
            return self.model.loss(batch.input_ids, batch.targets, cu_seqlens=batch.cu_seqlens,
                                   sp=self.sp, ignore_index=IGNORE_INDEX, check_ids=False)

    def forward_backward(self, batch: Batch) -> torch.Tensor:
        """Accumulate the gradient of the global mean token loss; returns that loss
        (summed over ranks, identical on all)."""
        self.model.train()
        loss_sum, count = self._loss_sum(batch)
        total = self.env.all_reduce_sum(count.to(torch.float32))
        loss = loss_sum / total
        loss.backward()
        if self.sp is not None:
            # Every later step has the shapes that this first one has checked across
            # the SP group, so skip the per-op shape all-gather from now on.
            self.sp.check_shapes = False
        return self.env.all_reduce_sum(loss.detach().clone())

    def optimizer_step(self) -> torch.Tensor:
        """Clip the accumulated gradients, step AdamW and the schedule, clear the
        gradients; returns the global gradient norm before clipping."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm

    def step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step; returns ``(loss, grad_norm)`` as tensors (no sync)."""
        loss = self.forward_backward(batch)
        return loss, self.optimizer_step()

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        """Mean token loss over ``batches`` (each rank passes its share)."""
        self.model.eval()
        acc = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        for batch in batches:
            loss_sum, count = self._loss_sum(batch)
            acc += torch.stack([loss_sum.double(), count.double()])
        self.env.all_reduce_sum(acc)
        return (acc[0] / acc[1]).item()

    def state_dict(self, step: int, sample: int) -> dict:
        """The DCP state: model and optimizer (sharded), scheduler, step, data position
        and this rank's RNG states (under a per-rank key, as they differ by rank)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        rng = {"cpu": torch.get_rng_state()}
        if self.env.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.env.device)
        return {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict(),
                "progress": {"step": step, "sample": sample},
                "rng": {f"rank{self.env.rank}": rng}}

    def load(self, path: Path, same_layout: bool) -> tuple[int, int]:
        """Restore from a checkpoint; returns ``(step, sample)``. RNG states are restored
        only when the checkpoint has the same world size (they are per rank)."""
        state = self.state_dict(0, 0)
        if not same_layout:
            del state["rng"]
        checkpoint.load(path, state)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(state["scheduler"])
        if same_layout:
            rng = state["rng"][f"rank{self.env.rank}"]
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], self.env.device)
        return state["progress"]["step"], state["progress"]["sample"]


@dataclasses.dataclass
class RunResult:
    """What :func:`run` did: the steps it ran and their losses (every step), the last
    evaluation loss, the run directory and its wall time."""
    out: Path
    steps: list[int]
    losses: list[float]
    eval_loss: float | None
    seconds: float


@dataclasses.dataclass
class Plan:
    """A checked run: the resolved config, model config (vocabulary set from the
    tokenizer), tokenizer, run directory and the checkpoints a resume may use, newest
    first (None for a new run; :func:`checkpoint.choose` picks the newest that verifies)."""
    cfg: TrainConfig
    model_cfg: ModelConfig
    tokenizer: object
    out: Path
    resume: list[Path] | None


def prepare(cfg: TrainConfig) -> Plan:
    """Every check that needs no data and no process group: the config, the tokenizer,
    the model config, and the run directory / checkpoint to resume. Raises
    :class:`ConfigError`."""
    cfg, model_cfg = resolve(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer)
    if "vocab_size" in cfg.model:
        if model_cfg.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"--set vocab_size: expected at least the tokenizer's "
                              f"{tokenizer.vocab_size} tokens, got {model_cfg.vocab_size}")
    else:
        padded = -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        model_cfg = dataclasses.replace(model_cfg, vocab_size=padded)
    out = cfg.out_dir
    resume = None
    if cfg.resume is not None:
        resume = checkpoint.candidates(cfg.resume, out)
        # Refuse another model now, from the newest readable description; choose() checks
        # the checkpoint it picks again once the ranks have verified it.
        metas = ((p, checkpoint.try_read_meta(p)) for p in resume)
        path, meta = next(((p, m) for p, m in metas if m is not None), (None, None))
        if meta is not None:
            checkpoint.check_compatible(meta, path, model_cfg.to_dict(), tokenizer.describe())
    elif checkpoint.list_checkpoints(out) and not cfg.overwrite:
        raise ConfigError(f"--out: expected a directory without checkpoints for a new run, got "
                          f"{str(out)!r} holding {checkpoint.list_checkpoints(out)[-1].name} "
                          "(pass --resume to continue it, --overwrite to start over, or another --out)")
    return Plan(cfg, model_cfg, tokenizer, out, resume)


def build_loaders(cfg: TrainConfig, tokenizer, env: DistEnv) -> tuple[Loader, Loader]:
    """Training and evaluation batches of this data-parallel rank."""
    corpus = load_documents(cfg.data)
    train_docs, eval_docs = split_documents(corpus, cfg.eval_docs)
    loaders = []
    for docs, shuffle, split in zip((train_docs, eval_docs), (True, False),
                                    split_names(len(corpus), len(eval_docs))):
        sampler = WindowSampler(token_stream(docs, tokenizer), cfg.seq_len, cfg.seed, shuffle, split)
        loaders.append(Loader(sampler, batch_size=cfg.batch_size, eos_id=tokenizer.eos_id,
                              packing=cfg.packing, dp_rank=env.dp_rank, dp=env.dp))
    return loaders[0], loaders[1]


def run(cfg: TrainConfig, env: DistEnv | None = None) -> RunResult:
    """Train as ``cfg`` says. ``env`` is the process layout (default: from torchrun's
    environment, joining and leaving the process group here)."""
    t0 = time.perf_counter()
    plan = prepare(cfg)
    own_env = env is None
    env = setup(plan.cfg.sp) if own_env else env
    try:
        return _train(plan, env, t0)
    finally:
        if own_env:
            teardown(env)


def _train(plan: Plan, env: DistEnv, t0: float) -> RunResult:
    cfg, model_cfg, tokenizer, out, resume = (plan.cfg, plan.model_cfg, plan.tokenizer, plan.out,
                                              plan.resume)
    if env.sp != cfg.sp:
        raise ConfigError(f"--sp: expected the sequence-parallel size of the process layout, "
                          f"{env.sp}, got {cfg.sp}")
    rank0 = env.rank == 0
    if cfg.overwrite and resume is None and rank0:
        shutil.rmtree(checkpoint.checkpoint_root(out), ignore_errors=True)
    env.barrier()
    notes = []
    if resume is not None:
        resume, meta, notes = checkpoint.choose(resume, lambda m, p: checkpoint.check_compatible(
            m, p, model_cfg.to_dict(), tokenizer.describe()))
    train_loader, eval_loader = build_loaders(cfg, tokenizer, env)
    trainer = Trainer(cfg, model_cfg, env)
    start = 0
    if resume is not None:
        start, sample = trainer.load(resume, same_layout=meta["world"] == env.world)
        train_loader.seek(start, sample)
    stop = cfg.stop_at or cfg.steps
    reporter = Reporter(out, active=rank0, total_steps=stop, start_step=start,
                        progress=cfg.progress)
    for note in notes:
        reporter.print(note)
    tokens_per_step = env.dp * cfg.batch_size * cfg.seq_len
    peak = peak_flops(env.device)
    reporter.print(
        f"seqpar train: preset {cfg.preset} ({trainer.num_params / 1e6:.2f}M params, mixers "
        f"{','.join(model_cfg.pattern)}), world {env.world} = dp {env.dp} x sp {env.sp} on "
        f"{env.device.type}, {tokens_per_step} tokens/step, "
        + (f"steps {start + 1}..{stop} of {cfg.steps}" if start < stop else f"no steps left of {cfg.steps}")
        + (f", resumed from {resume}" if resume else "") + f" -> {out}")
    eval_batches = [trainer.to_device(eval_loader.batch(i)) for i in range(cfg.eval_batches)]
    meta = {"model": model_cfg.to_dict(), "tokenizer": tokenizer.describe(), "world": env.world,
            "dp": env.dp, "sp": env.sp, "config": _jsonable(dataclasses.asdict(cfg)),
            "torch": torch.__version__}
    steps, losses, eval_loss, info, interval = [], [], None, "", None
    mark_t, mark_step = time.perf_counter(), start
    try:
        for step in range(start, stop):
            loss, grad_norm = trainer.step(trainer.to_device(train_loader.batch(step)))
            done = step + 1
            steps.append(done)
            losses.append(loss)
            is_log = done % cfg.log_every == 0 or done in (start + 1, stop)
            if is_log:
                now = time.perf_counter()
                tok_s = tokens_per_step * (done - mark_step) / (now - mark_t)
                interval = (mark_step + 1, done, torch.stack(losses[mark_step - start:]).mean().item())
                mark_t, mark_step = now, done
                mfu = None if peak is None else trainer.flops_per_token * tok_s / (peak * env.world)
                rec = {"step": done, "loss": interval[2], "lr": trainer.scheduler.get_last_lr()[0],
                       "grad_norm": grad_norm.item(), "tokens": done * tokens_per_step,
                       "tokens_per_s": tok_s, "mfu": mfu, "memory_gb": memory_gb(env.device)}
                reporter.log(rec)
                info = (f"loss {rec['loss']:.3f} | {tok_s / 1e3:.1f}k tok/s | MFU {format_mfu(mfu)}"
                        f" | mem {rec['memory_gb']:.2f} GB")
            reporter.advance(done, info, is_log)
            # Evaluation and checkpoints do not count against training throughput.
            pause = time.perf_counter()
            if eval_batches and (done % cfg.eval_every == 0 or done == cfg.steps):
                eval_loss = trainer.evaluate(eval_batches)
                reporter.log({"step": done, "eval_loss": eval_loss})
                reporter.print(f"step {done}: eval loss {eval_loss:.4f}")
            if done % cfg.save_every == 0 or done == stop:
                sample = train_loader.position(done)
                path = checkpoint.save(out, done, trainer.state_dict(done, sample),
                                       dict(meta, step=done, sample=sample), cfg.keep)
            mark_t += time.perf_counter() - pause
    finally:
        reporter.close()
    losses = [float(x) for x in losses]
    png = reporter.plot()
    seconds = time.perf_counter() - t0
    if steps:
        # The last logged record's loss, so this line agrees with metrics.jsonl.
        a, b, last = interval
        span = f"step {b}" if a == b else f"mean of steps {a}-{b}"
        reporter.print(f"done: steps {steps[0]}..{steps[-1]}, loss {losses[0]:.3f} (step {steps[0]}) -> "
                       f"{last:.3f} ({span})"
                       + (f", eval loss {eval_loss:.3f}" if eval_loss is not None else "")
                       + f", {seconds:.0f} s; checkpoint {path.name}, metrics "
                       f"{out / 'metrics.jsonl'}, plot {png}")
    else:
        reporter.print(f"nothing to do: {resume.name} is at step {start} and this run ends at step "
                       f"{stop}; pass a larger --steps to train on")
    return RunResult(out=out, steps=steps, losses=losses, eval_loss=eval_loss, seconds=seconds)


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
