"""Flow-matching sampler with MultiTalk's text + audio classifier-free guidance.

Semantics follow the official ``MultiTalkPipeline.generate``:

* timesteps ``linspace(1000, 1, steps)`` then ``0``, each shifted by
  ``t' = shift·t / (1 + (shift-1)·t)`` (in units of 1000);
* Euler update ``x ← x − v·(t_i − t_{i+1})/1000`` (the DiT predicts the velocity);
* guidance with three passes per step — conditional, no text (negative prompt, with audio),
  no text and no audio — ``v = uncond + s_t·(cond − drop_text) + s_a·(drop_text − uncond)``;
  with ``s_t == 1`` (distilled LoRAs) two passes: ``v = drop_audio + s_a·(cond − drop_audio)``;
* optional APG (adaptive projected guidance, momentum −0.75, norm threshold 55);
* optional TeaCache: skip a branch's transformer blocks when its timestep embedding moved
  little since the last full evaluation, re-using that branch's cached residual;
* streaming: motion-frame latents re-noised to the current timestep and written over the
  first latent frames after every step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000

# Branch names used across the sampler, TeaCache and the DiT call.
COND, DROP_TEXT, UNCOND, DROP_AUDIO = "cond", "drop_text", "uncond", "drop_audio"


def flow_timesteps(steps: int, shift: float, num_train: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """``[steps + 1]`` float32 timesteps from ~1000 down to 0, shifted."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    t = np.linspace(num_train, 1, steps, dtype=np.float32).tolist() + [0.0]
    out = []
    for v in t:
        x = torch.tensor([v], dtype=torch.float32) / num_train
        out.append((shift * x / (1 + (shift - 1) * x)) * num_train)
    return torch.cat(out)


def guidance_branches(text_scale: float, has_audio: bool = True) -> tuple[str, ...]:
    """The DiT passes one step needs."""
    if not has_audio:  # plain WAN 2.1 I2V: ordinary text CFG
        return (COND,) if math.isclose(text_scale, 1.0) else (COND, DROP_TEXT)
    if math.isclose(text_scale, 1.0):
        return (COND, DROP_AUDIO)
    return (COND, DROP_TEXT, UNCOND)


class MomentumBuffer:
    def __init__(self, momentum: float):
        self.momentum = momentum
        self.running_average: torch.Tensor | float = 0

    def update(self, value: torch.Tensor) -> None:
        self.running_average = value + self.momentum * self.running_average


def adaptive_projected_guidance(
    diff: torch.Tensor,
    pred_cond: torch.Tensor,
    momentum_buffer: Optional[MomentumBuffer] = None,
    eta: float = 0.0,
    norm_threshold: float = 55.0,
) -> torch.Tensor:
    """APG (arXiv 2410.02416): momentum, norm clipping, drop the part parallel to ``pred_cond``.

    ``diff`` and ``pred_cond`` are ``[C, T, H, W]``; norms are over all four dims.
    """
    if momentum_buffer is not None:
        momentum_buffer.update(diff)
        diff = momentum_buffer.running_average
    dims = [-1, -2, -3, -4]
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(diff), norm_threshold / norm)
    dtype = diff.dtype
    v0, v1 = diff.double(), torch.nn.functional.normalize(pred_cond.double(), dim=dims)
    parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
    orthogonal = v0 - parallel
    return (orthogonal + eta * parallel).to(dtype)


@dataclass
class GuidanceConfig:
    text_scale: float = 5.0
    audio_scale: float = 4.0
    use_apg: bool = False
    apg_momentum: float = -0.75
    apg_norm_threshold: float = 55.0


class Guidance:
    """Combines the branch predictions of one step (keeps APG momentum across steps)."""

    def __init__(self, cfg: GuidanceConfig, has_audio: bool = True):
        self.cfg = cfg
        self.has_audio = has_audio
        self.branches = guidance_branches(cfg.text_scale, has_audio)
        self._text_momentum = MomentumBuffer(cfg.apg_momentum) if cfg.use_apg else None
        self._audio_momentum = MomentumBuffer(cfg.apg_momentum) if cfg.use_apg else None

    def __call__(self, preds: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.cfg
        cond = preds[COND]
        if not self.has_audio:
            if DROP_TEXT not in preds:
                return cond
            return preds[DROP_TEXT] + c.text_scale * (cond - preds[DROP_TEXT])
        if DROP_AUDIO in preds:  # text scale 1: two passes
            if c.use_apg:
                return cond + (c.audio_scale - 1) * adaptive_projected_guidance(
                    cond - preds[DROP_AUDIO], cond, self._audio_momentum, norm_threshold=c.apg_norm_threshold
                )
            return preds[DROP_AUDIO] + c.audio_scale * (cond - preds[DROP_AUDIO])
        drop_text, uncond = preds[DROP_TEXT], preds[UNCOND]
        if c.use_apg:
            return (
                cond
                + (c.text_scale - 1)
                * adaptive_projected_guidance(cond - drop_text, cond, self._text_momentum, norm_threshold=c.apg_norm_threshold)
                + (c.audio_scale - 1)
                * adaptive_projected_guidance(drop_text - uncond, cond, self._audio_momentum, norm_threshold=c.apg_norm_threshold)
            )
        return uncond + c.text_scale * (cond - drop_text) + c.audio_scale * (drop_text - uncond)


# Official TeaCache polynomial fits (rescale of the relative L1 change of the modulated input).
TEACACHE_COEFFICIENTS = {
    ("multitalk-480", True): [2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01],
    ("multitalk-720", True): [8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02],
    ("multitalk-480", False): [-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01],
    ("multitalk-720", False): [-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683],
}


@dataclass
class TeaCache:
    """Per-branch residual cache (official TeaCache for MultiTalk, ``use_ret_steps=True``).

    The DiT asks :meth:`should_compute` before its blocks with the branch's timestep
    modulation ``e0``; when it says no, the DiT adds :attr:`residuals` [branch] instead of
    running the blocks. The first ``warmup_steps`` steps always compute.
    """

    threshold: float
    steps: int
    size: str = "multitalk-480"
    use_ret_steps: bool = True
    warmup_steps: int = 5
    step: int = 0
    accumulated: dict = field(default_factory=dict)
    previous: dict = field(default_factory=dict)
    residuals: dict = field(default_factory=dict)
    skipped: int = 0
    computed: int = 0

    def __post_init__(self):
        key = (self.size if self.size in ("multitalk-480", "multitalk-720") else "multitalk-480", self.use_ret_steps)
        self._poly = np.poly1d(TEACACHE_COEFFICIENTS[key])
        if not self.use_ret_steps:
            self.warmup_steps = 1

    def should_compute(self, branch: str, modulated: torch.Tensor) -> bool:
        compute = True
        last_step = (not self.use_ret_steps) and self.step >= self.steps - 1
        if self.step >= self.warmup_steps and not last_step and branch in self.previous and branch in self.residuals:
            prev = self.previous[branch]
            rel = ((modulated - prev).abs().mean() / prev.abs().mean()).item()
            self.accumulated[branch] = self.accumulated.get(branch, 0.0) + float(self._poly(rel))
            compute = self.accumulated[branch] >= self.threshold
        if compute:
            self.accumulated[branch] = 0.0
            self.computed += 1
        else:
            self.skipped += 1
        self.previous[branch] = modulated.detach().clone()
        return compute


def add_noise(clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Flow-matching forward process at timestep ``t`` (units of 1000)."""
    s = (t.float() / NUM_TRAIN_TIMESTEPS).view(-1, *([1] * (clean.dim() - 1)))
    return (1 - s) * clean + s * noise


DenoiseFn = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
# All of a step's branches in one call (batched guidance): (latent, t, branches) -> {branch: velocity}
DenoiseManyFn = Callable[[torch.Tensor, torch.Tensor, tuple], dict]


def sample(
    denoise: DenoiseFn,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    guidance: Guidance,
    motion_latents: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    on_step: Optional[Callable[[int, int], None]] = None,
    teacache: Optional[TeaCache] = None,
    denoise_many: Optional[DenoiseManyFn] = None,
    motion_noised: bool = True,
) -> torch.Tensor:
    """Run the sampler.

    Args:
        denoise: ``(latent [16, N_t, h, w], t [1], branch) -> velocity [16, N_t, h, w]``.
        noise: initial latent ``[16, N_t, h, w]``.
        timesteps: from :func:`flow_timesteps`.
        motion_latents: ``[16, T_m, h, w]`` latents of the previous chunk's motion frames
            (streaming); re-noised and written over the first ``T_m`` latent frames.
        on_step: ``(done, total)`` after every step; may raise to cancel.
        teacache: the cache ``denoise`` passes to the DiT; its step counter is kept here.
        denoise_many: if given, evaluates all of a step's guidance branches in one call
            (one batched DiT forward) instead of one ``denoise`` call per branch.
        motion_noised: ``False`` (InfiniteTalk): the motion latents are written back clean,
            not re-noised to the step's timestep (the official InfiniteTalk loop re-noises
            them and then overwrites them with the clean ones, before every DiT call and
            after every update).
    Returns:
        The denoised latent ``[16, N_t, h, w]`` float32.
    """
    latent = noise.clone()

    def inject(t: torch.Tensor) -> None:
        if motion_latents is not None and not motion_noised:
            latent[:, : motion_latents.shape[1]] = motion_latents.to(latent)
        elif motion_latents is not None:
            m = motion_latents.to(latent)
            n = torch.randn(m.shape, generator=generator, dtype=m.dtype, device="cpu").to(m.device)
            latent[:, : m.shape[1]] = add_noise(m, n, t)

    inject(timesteps[0:1])
    total = len(timesteps) - 1
    for i in range(total):
        t = timesteps[i : i + 1].to(latent.device)
        if teacache is not None:
            teacache.step = i
        if denoise_many is not None:
            preds = denoise_many(latent, t, guidance.branches)
        else:
            preds = {branch: denoise(latent, t, branch) for branch in guidance.branches}
        velocity = guidance(preds)
        dt = (timesteps[i] - timesteps[i + 1]) / NUM_TRAIN_TIMESTEPS
        latent = latent - velocity * dt
        inject(timesteps[i + 1 : i + 2])
        if on_step is not None:
            on_step(i + 1, total)
    return latent
