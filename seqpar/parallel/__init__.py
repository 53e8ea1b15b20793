"""Sequence parallelism: a sequence split across the ranks of a process group gives the
single-device outputs and gradients of every mixer.

``SequenceParallel(group, strategy, layout)`` is passed as ``sp=`` to the ops of
:mod:`seqpar.ops`; each rank passes its own shard. The helpers split a batch
(:func:`shard`), gather it back (:func:`unshard`), give global positions
(:func:`position_ids`) and per-rank views of packed sequences (:func:`shard_documents`,
:func:`local_cu_seqlens`). See docs/sequence_parallel.md.
"""
from ._geometry import Geometry, Piece
from .comm import Communicator, LocalCommunicator
from .sequence_parallel import SequenceParallel
from .sharding import local_cu_seqlens, position_ids, shard, shard_documents, unshard

__all__ = ["SequenceParallel", "Communicator", "LocalCommunicator", "Geometry", "Piece", "shard",
           "unshard", "position_ids", "shard_documents", "local_cu_seqlens"]
