"""Sampler: schedule, guidance against hand-computed values, APG, TeaCache, motion injection."""
from __future__ import annotations

import pytest
import torch

from multitalk.utils.sampler import (
    COND, DROP_AUDIO, DROP_TEXT, UNCOND, Guidance, GuidanceConfig, TeaCache, adaptive_projected_guidance,
    flow_timesteps, guidance_branches, sample,
)


def test_timesteps_match_the_official_shifted_linspace():
    t = flow_timesteps(4, shift=7.0)
    # official: linspace(1000, 1, 4) = 1000, 667, 334, 1; then 0; t' = 7t/(1+6t) in units of 1000
    raw = torch.tensor([1000.0, 667.0, 334.0, 1.0, 0.0]) / 1000
    expected = 7 * raw / (1 + 6 * raw) * 1000
    assert torch.allclose(t, expected, atol=1e-3)
    assert t[0] == 1000 and t[-1] == 0 and torch.all(t[:-1] > t[1:])


def test_three_pass_guidance_by_hand():
    cond, drop_text, uncond = torch.full((1,), 3.0), torch.full((1,), 2.0), torch.full((1,), 0.5)
    g = Guidance(GuidanceConfig(text_scale=5.0, audio_scale=4.0))
    assert g.branches == (COND, DROP_TEXT, UNCOND)
    out = g({COND: cond, DROP_TEXT: drop_text, UNCOND: uncond})
    # uncond + 5 (cond - drop_text) + 4 (drop_text - uncond) = 0.5 + 5 + 6 = 11.5
    assert out.item() == pytest.approx(11.5)


def test_two_pass_guidance_when_text_scale_is_one():
    g = Guidance(GuidanceConfig(text_scale=1.0, audio_scale=2.0))
    assert g.branches == (COND, DROP_AUDIO)
    out = g({COND: torch.tensor([3.0]), DROP_AUDIO: torch.tensor([1.0])})
    assert out.item() == pytest.approx(1.0 + 2.0 * 2.0)


def test_no_adapter_falls_back_to_text_cfg():
    assert guidance_branches(5.0, has_audio=False) == (COND, DROP_TEXT)
    g = Guidance(GuidanceConfig(text_scale=5.0), has_audio=False)
    assert g({COND: torch.tensor([2.0]), DROP_TEXT: torch.tensor([1.0])}).item() == pytest.approx(6.0)


def test_apg_removes_the_component_parallel_to_cond():
    cond = torch.randn(4, 2, 3, 3)
    diff = 2 * cond + torch.randn(4, 2, 3, 3)
    out = adaptive_projected_guidance(diff, cond, norm_threshold=0.0)
    assert abs(float((out * cond).sum())) < 1e-4 * float(cond.norm() * out.norm())
    clipped = adaptive_projected_guidance(diff * 1000, cond, norm_threshold=1.0)
    assert clipped.norm() <= 1.0 + 1e-5


def test_euler_sampler_on_a_linear_velocity_field_reaches_the_target():
    target = torch.randn(16, 2, 4, 4)

    def denoise(latent, t, branch):  # exact flow-matching velocity towards `target` from x_1 = noise
        s = t / 1000
        noise = (latent - (1 - s) * target) / s
        return noise - target

    noise = torch.randn(16, 2, 4, 4)
    out = sample(denoise, noise, flow_timesteps(20, 5.0), Guidance(GuidanceConfig(text_scale=1.0, audio_scale=1.0)))
    assert torch.allclose(out, target, atol=1e-4)


def test_motion_latents_are_pinned_after_the_last_step():
    motion = torch.randn(16, 1, 4, 4)
    calls = []

    def denoise(latent, t, branch):
        calls.append(branch)
        return torch.zeros_like(latent)

    out = sample(denoise, torch.randn(16, 3, 4, 4), flow_timesteps(3, 5.0), Guidance(GuidanceConfig()),
                 motion_latents=motion, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, :1], motion)  # t = 0 at the end: the clean motion latents
    assert calls == [COND, DROP_TEXT, UNCOND] * 3


def test_teacache_skips_after_warmup_when_inputs_barely_move():
    cache = TeaCache(threshold=0.5, steps=10, warmup_steps=2)
    e0 = torch.ones(1, 6, 8)
    decisions = []
    for step in range(6):
        cache.step = step
        decisions.append(cache.should_compute(COND, e0 * (1 + 1e-6 * step)))
        cache.residuals[COND] = torch.zeros(1)
    assert decisions[:2] == [True, True] and not all(decisions[2:])
    assert cache.skipped > 0
