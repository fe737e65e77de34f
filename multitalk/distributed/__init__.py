"""Multi-GPU execution of the DiT (Ray-free), over torch.distributed groups.

Sequence parallelism splits one forward's tokens over ranks; guidance parallelism runs a
step's guidance passes on different groups of ranks at once. Both can be combined.

>>> sp = SequenceParallel(group, ulysses_degree=2)      # group size 2
>>> sp.parallelize(model)                                # swaps self-attention kernels
>>> out = sp_forward(model, x, t, context, clip_fea, y, audio, ref_target_masks)  # every rank
>>> gp = GuidanceParallel(cfg_degree=3)                  # world size 3: one pass per rank
>>> DiffusionStage(model).guidance_parallel = gp         # the stage samples with it
"""
from .guidance_parallel import GuidanceParallel
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
    "GuidanceParallel",
    "SequenceParallel",
    "UlyssesAttention",
    "resolve_backend",
    "sp_forward",
    "validate_sp_degrees",
]
