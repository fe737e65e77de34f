"""Stage classes for ``bench/long_job.py``: the real stages on tiny weights, with the DiT's
and the VAE's *math* replaced by cheap stand-ins that keep their contracts (shapes, dtypes,
per-step progress), so that a 480p chunk costs what its data costs, not what a CPU needs
for a DiT over 32 760 tokens or a VAE over 81 frames of 448x896 (minutes each here).

Imported by name in the stage replicas (``stage_classes``), for whichever tree is on the
path: they build on that tree's ``multitalk.stages`` (the issue-21 tree and the commit
before it share these constructors), so both are measured through the same stand-ins.
"""
from __future__ import annotations

import torch


class FastVAE:
    """Latents <-> pixels by nearest-neighbour resampling: the Wan VAE's strides (4 in time,
    8 in space), shapes and value ranges, not its convolutions."""

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """``[1, 16, N_t, h, w]`` → ``[1, 3, 1 + 4 (N_t - 1), 8h, 8w]`` in [-1, 1]."""
        x = torch.tanh(latents[:, :3].float())
        x = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
        return x.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``[1, 3, F, H, W]`` → ``[1, 16, 1 + (F - 1) / 4, H / 8, W / 8]``."""
        first, rest = video[:, :, :1], video[:, :, 1:]
        b, c, f, h, w = rest.shape
        rest = rest.reshape(b, c, f // 4, 4, h, w).mean(dim=3)
        x = torch.nn.functional.avg_pool3d(torch.cat([first, rest], dim=2), (1, 8, 8))
        return x.repeat(1, 6, 1, 1, 1)[:, :16]


class ImageStage:
    """The tree's ``ImageStage`` (tiny CLIP, real) over :class:`FastVAE`."""

    @classmethod
    def from_pretrained(cls, models, device="cpu", dtype=None, **options):
        from multitalk.stages import ImageStage as Real

        stage = Real.from_pretrained(models, device=device, dtype=dtype, **options)
        stage.vae = FastVAE()
        return stage


class DecodeStage:
    """The tree's ``DecodeStage`` (its post-processing, whatever the tree does there) over :class:`FastVAE`."""

    @classmethod
    def from_pretrained(cls, models, device="cpu", dtype=None, **options):
        from multitalk.stages import DecodeStage as Real

        return Real(FastVAE(), tiled=False)


class DiffusionStage:
    """The DiT's contract without its math: latents of the chunk's shape from its noise and
    its conditioning, one progress event per step."""

    lip_sync = True

    @classmethod
    def from_pretrained(cls, models, device="cpu", dtype=None, **options):
        return cls()

    @torch.no_grad()
    def sample(self, job, audio, image, text, on_step=None):
        h, w = job.latent_hw
        n_t = 1 + (job.frames - 1) // 4
        noise = torch.randn(16, n_t, h, w, generator=torch.Generator().manual_seed(job.seed))
        latents = 0.5 * noise + 0.5 * image.cond_latents[4:].float()
        for step in range(job.steps):
            if on_step is not None:
                on_step(step + 1, job.steps)
        return latents
