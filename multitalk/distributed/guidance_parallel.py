"""Guidance parallelism: a step's guidance passes run on different ranks at once.

MultiTalk's sampler evaluates the DiT three times per step (text+audio, audio only, neither)
and mixes the three velocities. Those passes are independent, so ``cfg_degree`` groups of
ranks can each run some of them and exchange only the outputs (one velocity per pass, a few
MB) instead of activations: with ``cfg_degree = 3`` a step costs about one forward. It
combines with sequence parallelism: the ``cfg_degree × sp_degree`` ranks form
``cfg_degree`` sequence-parallel groups, and rank ``s`` of every group forms one guidance
group with the others' rank ``s``::

    cfg 2 × sp 2, world 4:   SP groups {0, 1} {2, 3}     guidance groups {0, 2} {1, 3}

Pass ``i`` of a step belongs to SP group ``i % cfg_degree``; after computing its passes each
rank broadcasts them over its guidance group, so every rank ends the step with all of them.
Ranks only need ``torch.distributed`` (gloo on CPU, nccl on CUDA); Ring attention is not
combined with it (the ring runs on the world group only).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist


class GuidanceParallel:
    """Split ``cfg_degree × sp_degree`` ranks (the world group) into SP and guidance groups.

    Every rank must construct it, in the same order relative to other group creations
    (``dist.new_group`` is collective).

    Attributes:
        sp_group: this rank's sequence-parallel group (``None`` when ``sp_degree == 1``).
        cfg_rank: which SP group this rank belongs to (``0 .. cfg_degree - 1``).
    """

    def __init__(self, cfg_degree: int, sp_degree: int = 1):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("GuidanceParallel needs torch.distributed initialised (dist.init_process_group)")
        world, rank = dist.get_world_size(), dist.get_rank()
        if cfg_degree < 1 or sp_degree < 1 or cfg_degree * sp_degree != world:
            raise ValueError(f"cfg_degree * sp_degree = {cfg_degree} * {sp_degree} must equal the world size {world}")
        self.cfg_degree, self.sp_degree = cfg_degree, sp_degree
        self.cfg_rank = rank // sp_degree
        self.sp_group: Optional[dist.ProcessGroup] = None
        for c in range(cfg_degree):
            members = list(range(c * sp_degree, (c + 1) * sp_degree))
            group = dist.new_group(members) if sp_degree > 1 else None
            if rank in members:
                self.sp_group = group
        self._guidance_ranks: list[int] = []
        self._guidance_group: Optional[dist.ProcessGroup] = None
        for s in range(sp_degree):
            members = [c * sp_degree + s for c in range(cfg_degree)]
            group = dist.new_group(members)
            if rank in members:
                self._guidance_group, self._guidance_ranks = group, members

    def owner(self, index: int) -> int:
        """The SP group that computes pass ``index`` of a step."""
        return index % self.cfg_degree

    def local_passes(self, branches: Sequence[str]) -> list[str]:
        return [b for i, b in enumerate(branches) if self.owner(i) == self.cfg_rank]

    def run(self, branches: Sequence[str], compute: Callable[[str], torch.Tensor],
            like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every pass's output on every rank: ``compute(branch)`` for this rank's passes, the
        others received from their owners. ``like``: a tensor with the outputs' shape, dtype
        and device (a rank may own no pass when ``cfg_degree`` exceeds their number)."""
        local = {b: compute(b).contiguous() for b in self.local_passes(branches)}
        out = {}
        for i, branch in enumerate(branches):
            tensor = local.get(branch)
            if tensor is None:
                tensor = torch.empty_like(like)
            dist.broadcast(tensor, src=self._guidance_ranks[self.owner(i)], group=self._guidance_group)
            out[branch] = tensor
        return out
