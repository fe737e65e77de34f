"""Low-VRAM mode: DiT blocks live in (pinned) CPU memory and visit the GPU one at a time.

The official ``--num_persistent_param_in_dit 0``: only the embeddings, the head and the
block being computed occupy GPU memory (about 0.4 GB of bf16 weights per block of the 14B
model instead of 33 GB for all 40). Each block's weights are copied in right before it
runs and dropped right after; with pinned memory the copy is a plain DMA at PCIe speed.

With ``prefetch`` the next block's copy starts on a side CUDA stream while the current
block computes, so the copy hides behind the compute (two blocks resident instead of one).
After the last block the first is fetched again, ready for the next forward.
"""
from __future__ import annotations

from typing import Optional

import torch


class BlockStreamer:
    """Attach to a model with ``.blocks``; :meth:`remove` undoes it.

    Args:
        model: the DiT (its ``blocks`` are streamed; every other child moves to ``device``).
        device: where blocks run.
        prefetch: copy block ``i + 1`` while block ``i`` runs (a side stream on CUDA; on
            other devices the copy is made at the same point, synchronously).
    """

    def __init__(self, model: torch.nn.Module, device: str | torch.device, prefetch: bool = False):
        self.device = torch.device(device)
        self.handles = []
        for name, module in model.named_children():
            if name != "blocks":
                module.to(self.device)
        pin = self.device.type == "cuda"
        self.hosts: list[dict[torch.nn.Parameter, torch.Tensor]] = []
        for index, block in enumerate(model.blocks):
            block.to("cpu")
            host = {}
            for p in block.parameters():
                if pin:
                    p.data = p.data.pin_memory()
                host[p] = p.data
            self.hosts.append(host)
            self.handles.append(block.register_forward_pre_hook(self._load(index)))
            self.handles.append(block.register_forward_hook(self._drop(index)))
        self.prefetch = prefetch
        self._copy_stream = torch.cuda.Stream(self.device) if prefetch and self.device.type == "cuda" else None
        # Block index -> (event marking the end of its copy or None, the device copies).
        self._staged: dict[int, tuple[Optional[torch.cuda.Event], dict]] = {}

    @property
    def staged_blocks(self) -> list[int]:
        """Blocks whose device copy is made (or under way) but not yet in use."""
        return sorted(self._staged)

    def _stage(self, index: int) -> None:
        """Start copying block ``index`` to the device (on the side stream when there is one)."""
        if index in self._staged:
            return
        host = self.hosts[index]
        if self._copy_stream is None:
            self._staged[index] = (None, {p: data.to(self.device, non_blocking=True) for p, data in host.items()})
            return
        with torch.cuda.stream(self._copy_stream):
            copies = {p: data.to(self.device, non_blocking=True) for p, data in host.items()}
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        self._staged[index] = (done, copies)

    def _load(self, index: int):
        def hook(module, args):
            self._stage(index)
            done, copies = self._staged.pop(index)
            if done is not None:  # the compute stream waits for the copy, not the host
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(done)
                for tensor in copies.values():
                    # Made on the copy stream, used on this one: keep the allocator from
                    # reusing the memory before this stream is done with it.
                    tensor.record_stream(compute)
            for p, tensor in copies.items():
                p.data = tensor
            if self.prefetch:
                self._stage((index + 1) % len(self.hosts))
        return hook

    def _drop(self, index: int):
        def hook(module, args, output):
            for p, data in self.hosts[index].items():
                p.data = data  # the device copy is freed when the block's last use ends
            return output
        return hook

    def discard_staged(self) -> None:
        """Forget device copies made ahead of use (their host weights have just changed,
        e.g. a LoRA merged in place); the next forward copies afresh."""
        self._staged.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._staged.clear()
