"""Low-VRAM mode: DiT blocks live in (pinned) CPU memory and visit the GPU one at a time.

The official ``--num_persistent_param_in_dit 0``: only the embeddings, the head and the
block being computed occupy GPU memory (about 0.4 GB of bf16 weights per block of the 14B
model instead of 33 GB for all 40). Each block's weights are copied in right before it
runs and dropped right after; with pinned memory the copy is a plain DMA at PCIe speed.
"""
from __future__ import annotations

import torch


class BlockStreamer:
    """Attach to a model with ``.blocks``; :meth:`remove` undoes it."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device):
        self.device = torch.device(device)
        self.handles = []
        for name, module in model.named_children():
            if name != "blocks":
                module.to(self.device)
        pin = self.device.type == "cuda"
        for block in model.blocks:
            block.to("cpu")
            host = {}
            for p in block.parameters():
                if pin:
                    p.data = p.data.pin_memory()
                host[p] = p.data
            self.handles.append(block.register_forward_pre_hook(self._load(host)))
            self.handles.append(block.register_forward_hook(self._drop(host)))

    def _load(self, host):
        def hook(module, args):
            for p, data in host.items():
                p.data = data.to(self.device, non_blocking=True)
        return hook

    @staticmethod
    def _drop(host):
        def hook(module, args, output):
            for p, data in host.items():
                p.data = data  # the device copy is freed when the block's last use ends
            return output
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
