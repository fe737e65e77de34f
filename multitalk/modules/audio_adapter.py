"""MultiTalk's audio adapter: audio projection, per-block audio cross-attention, L-RoPE.

Parameter names follow the official MultiTalk checkpoint (``audio_proj.proj1`` ...,
``blocks.N.audio_cross_attn.{q_linear,kv_linear,proj}``), so ``multitalk.safetensors``
loads without renaming.

Audio features reach the DiT as one window of wav2vec2 frames per video frame; the model
regroups them per *latent* frame (the VAE packs 4 video frames into one latent frame),
projects each group into ``context_tokens`` tokens, and every latent frame's video tokens
cross-attend to that frame's audio tokens only.

With several people, "L-RoPE" binds each person's video tokens to their own audio: the
self-attention map between video queries and the reference frame's keys, restricted by
per-person masks, says how much each token "belongs" to each person; that score is
scaled into a person-specific 1-D RoPE position range (two people, the official layout:
person 1 [0, 4], person 2 [20, 24], background 12), and each person's audio tokens sit
at the middle of their range (2 and 22). Attention then favours matching positions.

Three and four people (:func:`lrope_layout`) spread the ranges evenly over the same
[0, 24] span, as ComfyUI-WanVideoWrapper drives more than two speakers; the model was
trained on one and two people only, so quality past two is not what it was trained for.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .attention import AttentionKernel, LocalAttention
from .rope import apply_rope_1d


class AudioProjModel(nn.Module):
    """Projects windows of wav2vec2 features to audio context tokens.

    Args:
        seq_len: audio frames in the window of the first latent frame (5).
        seq_len_vf: audio frames in the window of the other latent frames
            (``audio_window + vae_scale - 1`` = 8).
        blocks: wav2vec2 layers stacked per audio frame (12).
        channels: wav2vec2 hidden size (768).
    """

    def __init__(
        self,
        seq_len: int = 5,
        seq_len_vf: int = 8,
        blocks: int = 12,
        channels: int = 768,
        intermediate_dim: int = 512,
        output_dim: int = 768,
        context_tokens: int = 32,
        norm_output_audio: bool = True,
        norm_fp32: bool = False,
    ):
        super().__init__()
        # InfiniteTalk: the output norm runs in float32 whatever the model dtype (see
        # MultiTalkTransformer3DModel's ``audio_norm_fp32``).
        self.norm_fp32 = norm_fp32
        self.context_tokens = context_tokens
        self.output_dim = output_dim
        self.proj1 = nn.Linear(seq_len * blocks * channels, intermediate_dim)
        self.proj1_vf = nn.Linear(seq_len_vf * blocks * channels, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, context_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim) if norm_output_audio else nn.Identity()

    def forward(self, first_frame: torch.Tensor, later_frames: torch.Tensor) -> torch.Tensor:
        """
        Args:
            first_frame: ``[P, 1, seq_len, blocks, channels]`` (P = people).
            later_frames: ``[P, N_t - 1, seq_len_vf, blocks, channels]``.
        Returns:
            ``[P, N_t, context_tokens, output_dim]``.
        """
        people = first_frame.shape[0]
        first = torch.relu(self.proj1(first_frame.flatten(2)))  # [P, 1, inter]
        later = torch.relu(self.proj1_vf(later_frames.flatten(2)))  # [P, N_t-1, inter]
        tokens = torch.cat([first, later], dim=1)
        n_t = tokens.shape[1]
        tokens = torch.relu(self.proj2(tokens.reshape(people * n_t, -1)))
        tokens = self.proj3(tokens).reshape(people * n_t, self.context_tokens, self.output_dim)
        tokens = self._norm_fp32(tokens) if self.norm_fp32 else self.norm(tokens)
        return tokens.reshape(people, n_t, self.context_tokens, self.output_dim)

    def _norm_fp32(self, tokens: torch.Tensor) -> torch.Tensor:
        """The output norm in float32 (input, weight and bias), rounded back to the input dtype."""
        if not isinstance(self.norm, nn.LayerNorm):
            return self.norm(tokens)
        weight = None if self.norm.weight is None else self.norm.weight.float()
        bias = None if self.norm.bias is None else self.norm.bias.float()
        out = torch.nn.functional.layer_norm(tokens.float(), self.norm.normalized_shape, weight, bias, self.norm.eps)
        return out.to(tokens.dtype)


def window_audio_per_latent_frame(
    audio: torch.Tensor, audio_window: int, vae_scale: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Regroup per-video-frame audio windows into per-latent-frame groups.

    Args:
        audio: ``[P, F, audio_window, blocks, channels]`` with ``F = 1 + vae_scale*(N_t-1)``
            video frames, each with a window of ``audio_window`` audio frames centred on it.
    Returns:
        ``(first, later)``: ``[P, 1, audio_window, B, C]`` and
        ``[P, N_t-1, audio_window + vae_scale - 1, B, C]``. For a latent frame covering
        video frames ``4k+1 .. 4k+4`` the group is: the first frame's window up to its
        centre, the centres of the middle frames, the last frame's window from its centre.
    """
    first = audio[:, :1]
    later = audio[:, 1:]
    p, f, w, b, c = later.shape
    later = later.reshape(p, f // vae_scale, vae_scale, w, b, c)
    mid = audio_window // 2
    head = later[:, :, :1, : mid + 1].flatten(2, 3)
    middle = later[:, :, 1:-1, mid : mid + 1].flatten(2, 3)
    tail = later[:, :, -1:, mid:].flatten(2, 3)
    return first, torch.cat([head, middle, tail], dim=2)


@torch.no_grad()
def reference_attention_map(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: tuple[int, int, int],
    ref_masks: torch.Tensor,
    head_groups: int = 2,
    ref_k: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """How strongly each video token attends to each person's region of the reference frame.

    Args:
        q: video queries after RoPE ``[1, S, H, D]`` (S may be a slice of all tokens).
        k: video keys after RoPE ``[1, S_all, H, D]``; the reference frame is the first
            latent frame, i.e. the first ``h*w`` tokens. Ignored when ``ref_k`` is given.
        grid: ``(N_t, h, w)`` token grid.
        ref_masks: ``[M, h*w]`` per-class masks over the reference frame's tokens
            (persons..., background).
        head_groups: the official code averages over heads in 2 groups (to bound memory);
            kept for identical rounding.
        ref_k: keys of the reference frame ``[1, h*w, H, D]`` if already gathered.
    Returns:
        ``[M, S]``: mean attention mass on each mask, averaged over heads.
    """
    _, h, w = grid
    if ref_k is None:
        ref_k = k[:, : h * w]
    heads = q.shape[2]
    per_group = heads // head_groups
    ref_masks = ref_masks.to(q.dtype)
    total = torch.zeros(ref_masks.shape[0], q.shape[1], device=q.device, dtype=q.dtype)
    scale = 1.0 / q.shape[-1] ** 0.5
    for g in range(head_groups):
        sl = slice(g * per_group, (g + 1) * per_group)
        qg = (q[:, :, sl] * scale).transpose(1, 2)  # [1, h', S, D]
        kg = ref_k[:, :, sl].to(q.dtype).transpose(1, 2)  # [1, h', R, D]
        probs = (qg @ kg.transpose(-2, -1)).softmax(-1).to(q.dtype)  # [1, h', S, R]
        maps = []
        for mask in ref_masks:
            m = (probs * mask[None, None, None]).sum(-1) / mask.sum()  # [1, h', S]
            maps.append(m.permute(0, 2, 1).mean(-1))  # [1, S]
        total += torch.cat(maps, dim=0)
    return total / head_groups


def _rescale(values: torch.Tensor, src: tuple[torch.Tensor, torch.Tensor], dst: tuple[float, float]) -> torch.Tensor:
    lo, hi = src
    return (values - lo) / (hi - lo + 1e-8) * (dst[1] - dst[0]) + dst[0]


def lrope_layout(people: int, class_range: int = 24, class_interval: int = 4
                 ) -> tuple[tuple[tuple[float, float], ...], float]:
    """Each person's 1-D RoPE range and the background's position, for ``people`` >= 2.

    Person ``i`` gets ``[s_i, s_i + class_interval]`` with the starts spread evenly from 0
    to ``class_range - class_interval``: two people get exactly the official ranges
    ([0, 4], [20, 24]); three [0, 4], [10, 14], [20, 24]; four [0, 4], [6.67, 10.67],
    [13.33, 17.33], [20, 24]. The background stays at the official ``class_range // 2``
    (12) unless a person's range covers it (three people): then it moves to the middle of
    the free gap nearest to it (7), so no person's audio is bound to the background.
    """
    if people < 2:
        raise ValueError(f"L-RoPE binds two or more people, got {people}")
    step = (class_range - class_interval) / (people - 1)
    if step < class_interval:  # ranges would overlap: at most class_range // class_interval people
        raise ValueError(f"{people} people do not fit a RoPE class range of {class_range} in steps of {class_interval}")
    ranges = tuple((i * step, i * step + class_interval) for i in range(people))
    background = float(class_range // 2)
    if any(lo <= background <= hi for lo, hi in ranges):
        gaps = [((a[1] + b[0]) / 2, b[0] - a[1]) for a, b in zip(ranges, ranges[1:]) if b[0] > a[1]]
        if not gaps:
            raise ValueError(f"no room for the background among {people} people's ranges")
        background = min(gaps, key=lambda gap: abs(gap[0] - class_range / 2))[0]
    return ranges, background


def lrope_positions(
    ref_map: torch.Tensor,
    person_ranges: tuple[tuple[float, float], ...],
    background: float,
    value_range: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-token 1-D positions for ``P`` people from the reference attention map.

    Args:
        ref_map: ``[P + 1, S]`` (person 1, ..., person P, background).
        person_ranges: ``P`` ranges (:func:`lrope_layout`).
        value_range: ``[P, 2]`` (min, max) per person over *all* tokens; defaults to the
            range over ``ref_map``. Sequence parallelism passes the global range so a
            rank's slice is scaled exactly like the whole sequence.
    Returns:
        ``[S]`` positions in ``ref_map``'s dtype: each token takes the position of the
        class it attends to most (its person's rescaled score, or the background's).
    """
    people = ref_map.shape[0] - 1
    if len(person_ranges) != people:
        raise ValueError(f"{len(person_ranges)} RoPE ranges for a map of {people} people")
    if value_range is None:
        value_range = torch.stack([ref_map[:people].min(1).values, ref_map[:people].max(1).values], dim=1)
    persons = [_rescale(ref_map[i], (value_range[i, 0], value_range[i, 1]), person_ranges[i]) for i in range(people)]
    bg = torch.full_like(persons[0], background)
    owner = ref_map.argmax(dim=0)
    candidates = torch.stack([*persons, bg], dim=1)  # [S, P + 1]
    return candidates.gather(1, owner[:, None]).squeeze(1)


class AudioCrossAttention(nn.Module):
    """Video tokens of each latent frame attend to that frame's audio tokens.

    Official name: ``SingleStreamMutiAttention`` (qk_norm off in the released model, so it
    has no norm parameters).
    """

    def __init__(
        self,
        dim: int,
        encoder_hidden_states_dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        class_range: int = 24,
        class_interval: int = 4,
    ):
        super().__init__()
        assert dim % num_heads == 0
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_linear = nn.Linear(encoder_hidden_states_dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.class_range, self.class_interval = class_range, class_interval
        self.attention: AttentionKernel = LocalAttention()

    def forward(
        self,
        x: torch.Tensor,
        audio_tokens: torch.Tensor,
        frames: int,
        people: int,
        ref_map: Optional[torch.Tensor] = None,
        ref_map_range: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            x: ``[1, frames * S_f, dim]`` video tokens grouped by latent frame (S_f tokens
                per frame; a sequence-parallel rank passes whole frames).
            audio_tokens: ``[frames, people * context_tokens, audio_dim]``.
            people: 1 to 4 (``audio_tokens`` holds each person's ``context_tokens`` in
                turn); with 2 or more, ``ref_map`` ``[people + 1, frames * S_f]`` is required.
        Returns:
            ``[1, frames * S_f, dim]``.
        """
        _, seq, dim = x.shape
        per_frame = seq // frames
        n, d = self.num_heads, self.head_dim
        q = self.q_linear(x).view(frames, per_frame, n, d)
        kv = self.kv_linear(audio_tokens).view(frames, -1, 2, n, d)
        k, v = kv.unbind(2)  # [frames, A, n, d]

        if people >= 2:
            assert ref_map is not None, "two or more people need the reference attention map"
            ranges, background = lrope_layout(people, self.class_range, self.class_interval)
            q_pos = lrope_positions(ref_map, ranges, background, ref_map_range)
            q = apply_rope_1d(q.reshape(1, seq, n, d).transpose(1, 2), q_pos).transpose(1, 2)
            q = q.reshape(frames, per_frame, n, d)
            tokens_per_frame = k.shape[1]
            per_person = tokens_per_frame // people
            k_pos = torch.empty(tokens_per_frame, dtype=k.dtype, device=k.device)
            for person, (lo, hi) in enumerate(ranges):  # each person's audio tokens at their range's middle
                k_pos[person * per_person : (person + 1) * per_person] = (lo + hi) / 2
            k_pos = k_pos.repeat(frames)
            k = apply_rope_1d(k.reshape(1, -1, n, d).transpose(1, 2), k_pos).transpose(1, 2)
            k = k.reshape(frames, tokens_per_frame, n, d)

        out = self.attention(q, k, v)  # [frames, S_f, n, d]
        return self.proj(out.reshape(1, seq, dim))
