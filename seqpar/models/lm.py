"""Hybrid decoder language model: a per-layer mixer pattern over pre-norm blocks."""
from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import fail
from ..layers import (
    ImplicitFilter,
    RMSNorm,
    SwiGLU,
    build_mixer,
    default_positions,
    use_graph_breaks,
)
from ..layers.attention import check_positions
from ..ops.validate import check_tensor
from .config import ModelConfig
from .loss import linear_cross_entropy

# Dynamo's default recompile limit: the compiled variants one function may have.
_RECOMPILE_LIMIT = 8


class Block(nn.Module):
    """``x + mixer(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, mixer: str, cfg: ModelConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = build_mixer(mixer, d_model=cfg.d_model, n_heads=cfg.n_heads,
                                 head_dim=cfg.head_dim, n_kv_heads=cfg.n_kv_heads,
                                 conv_size=cfg.conv_size, norm_eps=cfg.norm_eps,
                                 chunk_size=cfg.chunk_size, backend=cfg.backend,
                                 rope_theta=cfg.rope_theta, time_scale=cfg.max_seq_len)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def reset_parameters(self, std: float, out_std: float) -> None:
        self.mixer_norm.reset_parameters()
        self.mlp_norm.reset_parameters()
        self.mixer.reset_parameters(std, out_std)
        self.mlp.reset_parameters(std, out_std)

    def _mlp(self, x, h):
        x = x + h
        return x + self.mlp(self.mlp_norm(x))

    def forward(self, x, **mixer_kwargs):
        """x (B, T, D); ``mixer_kwargs`` go to the mixer's forward. Returns (x, cache)."""
        h, cache = self.mixer(self.mixer_norm(x), **mixer_kwargs)
        return self._mlp(x, h), cache

    def step(self, x, cache):
        h, cache = self.mixer.step(self.mixer_norm(x), cache)
        return self._mlp(x, h), cache


class HybridLM(nn.Module):
    """Decoder LM: embedding, ``n_layers`` pre-norm :class:`Block` s whose mixers follow
    ``config.pattern``, final RMSNorm, LM head (optionally tied to the embedding).

    Init: embedding, projections and head ~ N(0, init_std); the projections that write
    into the residual stream (mixer and MLP outputs) ~ N(0, init_std / sqrt(2 n_layers));
    mixer-specific gate parameters as their papers do (see :mod:`seqpar.layers`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            fail("config", "a seqpar.models.ModelConfig", type(config).__name__)
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(name, config) for name in config.mixers)
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re-)initialize every parameter and buffer, e.g. after ``to_empty``."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            block.reset_parameters(std, out_std)
        self.norm.reset_parameters()

    def _check_ids(self, input_ids, name="input_ids", values=True):
        """Type, shape and device; with ``values`` also the id range, which reads the ids
        on the host (a wait for the device when they live there)."""
        check_tensor(name, input_ids, ndim=2, dtypes=(torch.int64, torch.int32),
                     device=self.embed.weight.device)
        if input_ids.shape[1] == 0:
            fail(name, "at least one token, shape (B, T >= 1)", f"shape {tuple(input_ids.shape)}")
        if values:
            check_token_ids(name, input_ids, self.config.vocab_size)
        return input_ids.shape

    def _logits(self, x):
        return self.lm_head(self.norm(x))

    def hidden_states(self, input_ids: torch.Tensor, *, cu_seqlens=None, position_ids=None,
                      sp=None, check_ids: bool = True) -> torch.Tensor:
        """The final normalized hidden states (B, T, D), which the LM head maps to
        logits; arguments as :meth:`forward`."""
        B, T = self._check_ids(input_ids, values=check_ids)
        if position_ids is None:
            position_ids = default_positions(T, input_ids.device, cu_seqlens, sp)
        else:
            check_positions(position_ids, B, T, input_ids.device)
        x = self.embed(input_ids)
        for block in self.blocks:
            x, _ = block(x, cu_seqlens=cu_seqlens, position_ids=position_ids, sp=sp)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, *, cu_seqlens=None, position_ids=None,
                sp=None, check_ids: bool = True) -> torch.Tensor:
        """Next-token logits.

        Args:
            input_ids: (B, T) int64 (or int32) token ids; under ``sp`` this rank's shard.
            cu_seqlens: int32 (N + 1,) offsets of packed documents (B == 1); global
                offsets of the whole packed stream under ``sp``.
            position_ids: (T,) or (B, T) RoPE positions; default: the tokens' positions
                in their documents (global under ``sp``, via ``seqpar.parallel``).
            sp: a ``seqpar.parallel.SequenceParallel``; every mixer runs
                sequence-parallel and the result is this rank's slice of the
                single-device logits.
            check_ids: check that the ids lie in the vocabulary (reads them on the host;
                a caller that checked them there before moving them to the GPU passes
                False, so the step never waits for the device).
        Returns:
            logits (B, T, vocab_size) in the compute dtype.
        """
        return self.lm_head(self.hidden_states(input_ids, cu_seqlens=cu_seqlens,
                                               position_ids=position_ids, sp=sp,
                                               check_ids=check_ids))

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, *, cu_seqlens=None,
             position_ids=None, sp=None, ignore_index: int = -100,
             check_ids: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy and the number of targets it sums.

        The head and the loss run chunk by chunk of tokens
        (:func:`seqpar.models.loss.linear_cross_entropy`), so the (tokens, vocab)
        float32 logits are never whole. ``targets`` (B, T) int64 ids, ``ignore_index``
        where no loss is taken; other arguments as :meth:`forward`. Returns
        ``(loss_sum, count)``: float32 and int64 scalars on the model's device (no host
        read).
        """
        B, T = self._check_ids(input_ids, values=check_ids)
        check_tensor("targets", targets, shape=(B, T), dtypes=(torch.int64, torch.int32),
                     device=input_ids.device)
        h = self.hidden_states(input_ids, cu_seqlens=cu_seqlens, position_ids=position_ids,
                               sp=sp, check_ids=False)
        flat = targets.reshape(-1)
        loss_sum = linear_cross_entropy(h.reshape(B * T, -1), self.lm_head.weight, flat,
                                        ignore_index=ignore_index)
        return loss_sum, (flat != ignore_index).sum()

    def prefill(self, input_ids: torch.Tensor):
        """Parallel forward over a prompt (B, T) that also returns the per-layer
        generation caches: ``(logits (B, T, V), caches)``."""
        self._check_ids(input_ids)
        x = self.embed(input_ids)
        caches = []
        for block in self.blocks:
            x, cache = block(x, output_state=True)
            caches.append(cache)
        return self._logits(x), caches

    def step(self, token_ids: torch.Tensor, caches: list):
        """One token per row, ``token_ids (B, 1)``, after :meth:`prefill` or ``step``:
        ``(logits (B, 1, V), caches)``."""
        B, T = self._check_ids(token_ids, "token_ids")
        if T != 1:
            fail("token_ids", "one token per row, shape (B, 1)", f"shape {(B, T)}")
        if not isinstance(caches, list) or len(caches) != len(self.blocks):
            fail("caches", f"the list of {len(self.blocks)} per-layer caches from prefill()/step()",
                 type(caches).__name__)
        x = self.embed(token_ids)
        new = []
        for block, cache in zip(self.blocks, caches):
            x, cache = block.step(x, cache)
            new.append(cache)
        return self._logits(x), new

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample a continuation of a batch of prompts.

        Prefills with the parallel forward (returning recurrent / short-conv states for
        linear layers, KV caches for attention, the input history for Hyena), then one
        :meth:`step` per new token.

        Args:
            input_ids: (B, T) prompts of equal length.
            max_new_tokens: tokens to add (>= 0).
            temperature: softmax temperature; 0 picks the most likely token.
            top_k: sample among the k most likely tokens only (None: all).
            generator: a ``torch.Generator`` for reproducible sampling.
        Returns:
            (B, T + max_new_tokens) int64: the prompts followed by the new tokens.
        """
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            fail("max_new_tokens", "an int >= 0", repr(max_new_tokens))
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
            fail("temperature", "a number >= 0", repr(temperature))
        V = self.config.vocab_size
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)
                                  or not 1 <= top_k <= V):
            fail("top_k", f"None or an int in [1, {V}]", repr(top_k))
        out = [input_ids.long()]
        if max_new_tokens == 0:
            return out[0]
        logits, caches = self.prefill(input_ids)
        for i in range(max_new_tokens):
            tok = _sample(logits[:, -1].float(), temperature, top_k, generator)
            out.append(tok)
            if i + 1 < max_new_tokens:
                logits, caches = self.step(tok, caches)
        return torch.cat(out, 1)

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` every block's forward in place (regional compilation).

        Blocks of one mixer type share their compiled code, so the compile time is that
        of one block per type, not per layer. The mixers' own kernels run outside the
        graphs (``seqpar.layers.call_eager``); what lies around them fuses. Module hooks
        (activation checkpointing, FSDP) stay outside the compiled forward, so either
        may be applied before or after. Parameter names do not change.

        Every block runs the same code (``Block.forward``, and ``LinearMixer.forward``
        for all linear mixers), and Dynamo keeps one cache of compiled variants per code
        object, which gives up and runs eagerly past ``torch._dynamo.config.
        recompile_limit`` entries. So the limit is raised to its value times the number
        of mixer types: each type gets the budget that one compiled function has.
        """
        use_graph_breaks()
        types = len({type(block.mixer) for block in self.blocks})
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, _RECOMPILE_LIMIT * types)
        for block in self.blocks:
            block.forward = torch.compile(block.forward, **options)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters (a tied embedding / head counted once); ``exclude_embeddings``
        leaves out the embedding table (and with it a tied head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n

    def matmul_params(self) -> int:
        """Weights used once per token in a multiply-add: every parameter of two or more
        dimensions (projections, short-conv taps, the LM head) except the embedding
        table when untied (a lookup) and Hyena's filter MLP (it runs once per position
        per step, not per token)."""
        skip = {id(p) for m in self.modules() if isinstance(m, ImplicitFilter) for p in m.parameters()}
        if not self.config.tie_embeddings:
            skip.add(id(self.embed.weight))
        return sum(p.numel() for p in self.parameters() if p.dim() >= 2 and id(p) not in skip)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at sequence length ``seq_len``,
        for MFU: ``6 N`` with N = :meth:`matmul_params`, plus each mixer's sequence
        term (``Mixer.flops_per_token``: causal attention ``6 H Dh T``, the linear
        family's recurrent state work, Hyena's FFTs). Norms, activations and gates are
        left out."""
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
            fail("seq_len", "an int >= 1", repr(seq_len))
        return 6.0 * self.matmul_params() + sum(b.mixer.flops_per_token(seq_len) for b in self.blocks)


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    """Token ids in ``[0, vocab_size)`` (reads them on the host)."""
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        fail(name, f"token ids in [0, {vocab_size})", f"ids in [{lo}, {hi}]")


def _sample(logits, temperature, top_k, generator):
    """(B, V) float logits -> (B, 1) int64 token ids."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)
