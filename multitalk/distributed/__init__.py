"""Multi-GPU execution of the DiT (Ray-free): sequence parallelism over a torch.distributed group.

>>> sp = SequenceParallel(group, ulysses_degree=2)      # group size 2
>>> sp.parallelize(model)                                # swaps self-attention kernels
>>> out = sp_forward(model, x, t, context, clip_fea, y, audio, ref_target_masks)  # every rank
"""
from .sequence_parallel import (
    BACKENDS,
    FrameSplit,
    SequenceParallel,
    UlyssesAttention,
    resolve_backend,
    sp_forward,
    validate_sp_degrees,
)

__all__ = [
    "BACKENDS",
    "FrameSplit",
    "SequenceParallel",
    "UlyssesAttention",
    "resolve_backend",
    "sp_forward",
    "validate_sp_degrees",
]
