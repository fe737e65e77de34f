"""WAN 2.1 image-to-video DiT with the MultiTalk audio adapter.

Parameter names and math follow the official MultiTalk ``WanModel``
(``wan/modules/multitalk_model.py``), so the official shards + ``multitalk.safetensors``
load without renaming and give the official numbers. The diffusers ``transformer/`` layout
of the base model is renamed on load (``multitalk.checkpoints.dit``).

Shapes (one sample, as the official sampler calls it):

* ``x``      noisy latents            ``[16, N_t, h, w]`` (N_t = 1 + (frames-1)/4, h = H/8)
* ``t``      timestep                 ``[1]`` in [0, 1000]
* ``context`` UMT5 embeddings          ``[L, text_dim]`` (L <= text_len, zero-padded here)
* ``clip_fea`` CLIP tokens             ``[1, 257, image_dim]``
* ``y``      mask + VAE conditioning   ``[4 + 16, N_t, h, w]``
* ``audio``  wav2vec2 windows          ``[P, frames, audio_window, audio_blocks, audio_channels]``
* ``ref_target_masks`` person masks    ``[P + 1, h, w]`` (latent resolution; persons..., background)
* output: velocity                     ``[16, N_t, h, w]`` float32

Tokens: patches of (1, 2, 2) latents, ``N_t * h/2 * w/2`` of them, frame-major.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .attention import AttentionKernel, LocalAttention
from .audio_adapter import AudioCrossAttention, AudioProjModel, reference_attention_map, window_audio_per_latent_frame
from .rope import VideoRotaryCache, apply_video_rope


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """``[len(position), dim]`` float64: cos then sin halves."""
    half = dim // 2
    position = position.type(torch.float64)
    sinusoid = torch.outer(position, torch.pow(10000, -torch.arange(half).to(position).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


def _fp32_sequential(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    for layer in seq:
        if isinstance(layer, nn.Linear):
            x = F.linear(x, layer.weight.float(), None if layer.bias is None else layer.bias.float())
        else:
            x = layer(x)
    return x


class WanRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype (as the official)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, elementwise_affine=elementwise_affine, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


@dataclass
class TokenLayout:
    """Where this forward's tokens sit in the full sequence (all of it, or one SP rank's part)."""

    grid: tuple[int, int, int]  # (N_t, h, w) in tokens
    start: int = 0  # first token index held here
    length: int = -1  # tokens held here (-1: all)

    @property
    def total(self) -> int:
        return math.prod(self.grid)

    @property
    def stop(self) -> int:
        return self.total if self.length < 0 else self.start + self.length


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        # Swapped for a sequence-parallel kernel by multitalk.distributed.
        self.attention: AttentionKernel = LocalAttention()

    def forward(self, x: torch.Tensor, rotations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x ``[1, S, dim]``, rotations ``[S, 1, head_dim/2, 2]`` → (out ``[1, S, dim]``, q, k roped ``[1, S, H, D]``)."""
        b, s = x.shape[:2]
        n, d = self.num_heads, self.head_dim
        q = apply_video_rope(self.norm_q(self.q(x)).view(b, s, n, d), rotations)
        k = apply_video_rope(self.norm_k(self.k(x)).view(b, s, n, d), rotations)
        v = self.v(x).view(b, s, n, d)
        out = self.attention(q, k, v).type_as(x)
        return self.o(out.flatten(2)), q.type_as(x), k.type_as(x)


class WanI2VCrossAttention(WanSelfAttention):
    """Cross-attention to text tokens and, separately, to the 257 CLIP image tokens; summed."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6, image_tokens: int = 257):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.image_tokens = image_tokens
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x ``[1, S, dim]``, context ``[1, 257 + text_len, dim]`` (image tokens first)."""
        b, n, d = x.shape[0], self.num_heads, self.head_dim
        context_img, context_txt = context[:, : self.image_tokens], context[:, self.image_tokens :]
        q = self.norm_q(self.q(x)).view(b, -1, n, d)
        k = self.norm_k(self.k(context_txt)).view(b, -1, n, d)
        v = self.v(context_txt).view(b, -1, n, d)
        k_img = self.norm_k_img(self.k_img(context_img)).view(b, -1, n, d)
        v_img = self.v_img(context_img).view(b, -1, n, d)
        img_out = self.attention(q, k_img, v_img).flatten(2)
        txt_out = self.attention(q, k, v).flatten(2)
        return self.o(txt_out + img_out)


class MultiTalkBlock(nn.Module):
    """Self-attention → text/image cross-attention → audio cross-attention → FFN."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        qk_norm: bool,
        cross_attn_norm: bool,
        eps: float,
        audio_dim: Optional[int],
        norm_input_visual: bool = True,
        class_range: int = 24,
        class_interval: int = 4,
    ):
        super().__init__()
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, num_heads, qk_norm, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = WanI2VCrossAttention(dim, num_heads, qk_norm, eps)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        # audio_dim None: the plain WAN 2.1 I2V block (no MultiTalk adapter weights available).
        self.audio_cross_attn = None
        if audio_dim is not None:
            self.audio_cross_attn = AudioCrossAttention(
                dim, audio_dim, num_heads, qkv_bias=True, class_range=class_range, class_interval=class_interval
            )
            self.norm_x = WanLayerNorm(dim, eps, elementwise_affine=True) if norm_input_visual else nn.Identity()
        # Set by multitalk.distributed: computes the reference map and its value range
        # from this rank's queries and the gathered reference keys.
        self.ref_map_fn = None

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        rotations: torch.Tensor,
        context: torch.Tensor,
        audio_tokens: torch.Tensor,
        people: int,
        ref_masks: Optional[torch.Tensor],
        layout: TokenLayout,
    ) -> torch.Tensor:
        """x ``[1, S, dim]``; e0 ``[1, 6, dim]`` float32; returns ``[1, S, dim]``."""
        dtype = x.dtype
        e = (self.modulation.to(e0.device).float() + e0).chunk(6, dim=1)

        y, q, k = self.self_attn((self.norm1(x).float() * (1 + e[1]) + e[0]).type_as(x), rotations)
        x = (x.float() + y.float() * e[2]).to(dtype)

        x = x + self.cross_attn(self.norm3(x), context)

        if self.audio_cross_attn is not None:
            if isinstance(people, int):
                x = x + self._audio_attention(x, q, k, audio_tokens, people, ref_masks, layout)
            else:  # batched guidance: each sample has its own audio and speaker count
                x = x + torch.cat([
                    self._audio_attention(x[i : i + 1], q[i : i + 1], k[i : i + 1], audio_tokens[i], people[i],
                                          ref_masks, layout)
                    for i in range(len(people))
                ])

        y = self.ffn((self.norm2(x).float() * (1 + e[4]) + e[3]).to(dtype))
        return (x.float() + y.float() * e[5]).to(dtype)

    def _audio_attention(self, x, q, k, audio_tokens, people, ref_masks, layout) -> torch.Tensor:
        ref_map = ref_range = None
        if people >= 2:
            if self.ref_map_fn is not None:
                ref_map, ref_range = self.ref_map_fn(q, k, layout, ref_masks)
            else:
                ref_map = reference_attention_map(q, k, layout.grid, ref_masks)
        frames = audio_tokens.shape[0]
        return self.audio_cross_attn(self.norm_x(x), audio_tokens, frames, people, ref_map, ref_range)


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float = 1e-6):
        super().__init__()
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x ``[1, S, dim]``, e ``[1, dim]`` float32 → ``[1, S, prod(patch) * out_dim]`` float32."""
        e = (self.modulation.to(e.device).float() + e.unsqueeze(1)).chunk(2, dim=1)
        x = self.norm(x).float() * (1 + e[1]) + e[0]
        return F.linear(x, self.head.weight.float(), None if self.head.bias is None else self.head.bias.float())


class MLPProj(nn.Module):
    """CLIP tokens → DiT width (``img_emb.proj.{0,1,3,4}``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclass
class DiTInputs:
    """A step's embedded DiT inputs (:meth:`MultiTalkTransformer3DModel.embed_inputs`).

    ``tokens`` ``[1, S, dim]``; ``e`` ``[1, dim]`` and ``e0`` ``[1, 6, dim]`` float32;
    ``context`` ``[B, 257 + text_len, dim]`` (one row per guidance pass); per pass
    ``audio_tokens`` ``[N_t, P * context_tokens, output_dim]`` (``None`` without the
    adapter) and ``people`` ``P``; ``masks`` ``[P + 1, h_tok * w_tok]`` or ``None``;
    ``rotations`` the 3-axis RoPE of every token.
    """

    grid: tuple[int, int, int]
    tokens: torch.Tensor
    e: torch.Tensor
    e0: torch.Tensor
    context: torch.Tensor
    audio_tokens: list[Optional[torch.Tensor]]
    people: list[int]
    masks: Optional[torch.Tensor]
    rotations: torch.Tensor


class MultiTalkTransformer3DModel(ModelMixin, ConfigMixin):
    """The MultiTalk DiT. Config keys are the official ``config.json`` ones, plus
    ``image_dim`` / ``audio_blocks`` / ``audio_channels`` (fixed at 1280 / 12 / 768 in the
    official code; parameters here so tiny test models can shrink their encoders too).

    ``audio_norm_fp32``: the InfiniteTalk variant of the model (``InfiniteTalk/*/infinitetalk.safetensors``
    on the same base) computes the audio projection's output LayerNorm in float32 (its
    ``multitalk_model.py`` wraps it in an fp32 autocast); MultiTalk runs it in the model dtype.
    The same in fp32; with a bf16 model the tokens are normalised in fp32 and rounded once.
    
    (The class is long because ``__init__`` declares every official submodule under its
    checkpoint name and the three forward paths sit together; the blocks, embeddings and
    the audio adapter are their own modules.)
    """

    config_name = "config.json"
    _no_split_modules = ["MultiTalkBlock"]
    # diffusers' regional compilation (``compile_repeated_blocks``) compiles this block once:
    # all 40 share the compiled code, and a step's guidance passes need at most two graphs
    # (one speaker, and the job's speaker count), so sampling never recompiles.
    _repeated_blocks = ["MultiTalkBlock"]
    ignore_for_config = ["_class_name", "_diffusers_version"]

    @register_to_config
    def __init__(
        self,
        model_type: str = "i2v",
        patch_size: tuple[int, int, int] = (1, 2, 2),
        text_len: int = 512,
        in_dim: int = 36,
        dim: int = 5120,
        ffn_dim: int = 13824,
        freq_dim: int = 256,
        text_dim: int = 4096,
        out_dim: int = 16,
        num_heads: int = 40,
        num_layers: int = 40,
        window_size: tuple[int, int] = (-1, -1),
        qk_norm: bool = True,
        cross_attn_norm: bool = True,
        eps: float = 1e-6,
        audio_window: int = 5,
        intermediate_dim: int = 512,
        output_dim: int = 768,
        context_tokens: int = 32,
        vae_scale: int = 4,
        norm_input_visual: bool = True,
        norm_output_audio: bool = True,
        image_dim: int = 1280,
        audio_blocks: int = 12,
        audio_channels: int = 768,
        class_range: int = 24,
        class_interval: int = 4,
        audio_adapter: bool = True,
        audio_norm_fp32: bool = False,
    ):
        super().__init__()
        if model_type != "i2v":
            raise ValueError(f"MultiTalk needs the i2v model type, got {model_type!r}")
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim {dim} must split into {num_heads} heads of even size")
        self.patch_size = tuple(patch_size)
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(
            [
                MultiTalkBlock(
                    dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps, output_dim if audio_adapter else None,
                    norm_input_visual, class_range, class_interval,
                )
                for _ in range(num_layers)
            ]
        )
        self.head = Head(dim, out_dim, self.patch_size, eps)
        self.img_emb = MLPProj(image_dim, dim)
        self.audio_proj = None
        if audio_adapter:
            self.audio_proj = AudioProjModel(
                seq_len=audio_window,
                seq_len_vf=audio_window + vae_scale - 1,
                blocks=audio_blocks,
                channels=audio_channels,
                intermediate_dim=intermediate_dim,
                output_dim=output_dim,
                context_tokens=context_tokens,
                norm_output_audio=norm_output_audio,
                norm_fp32=audio_norm_fp32,
            )
        # The self-attention rotations per token grid, on the device the tokens are on.
        self.rope = VideoRotaryCache(dim // num_heads)

    # ------------------------------------------------------------------ helpers
    @property
    def has_audio(self) -> bool:
        return self.audio_proj is not None

    def set_attention_backend(self, backend: Optional[str]) -> None:
        """Use a diffusers attention backend (``"native"``, ``"flash"``, ``"_flash_3"``, ``"sage"`` ...)."""
        for block in self.blocks:
            for attn in (block.self_attn, block.cross_attn, block.audio_cross_attn):
                if attn is not None and isinstance(attn.attention, LocalAttention):
                    attn.attention = LocalAttention(backend)

    def token_grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """``[C, N_t, h, w]`` latents → token grid ``(N_t, h/2, w/2)``."""
        _, t, h, w = latent_shape
        p = self.patch_size
        return (t // p[0], h // p[1], w // p[2])

    def embed_conditions(self, t: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor, dtype: torch.dtype):
        """Timestep and text/image context embeddings (shared by every token).

        Returns ``(e [1, dim] f32, e0 [1, 6, dim] f32, context [1, 257 + text_len, dim])``.
        """
        cfg = self.config
        # The official computes these under fp32 autocast even for a bf16 model.
        e = _fp32_sequential(self.time_embedding, sinusoidal_embedding_1d(cfg.freq_dim, t).float())
        e0 = _fp32_sequential(self.time_projection, e).unflatten(1, (6, cfg.dim))
        if context.shape[0] > cfg.text_len:
            context = context[: cfg.text_len]
        padded = torch.cat([context, context.new_zeros(cfg.text_len - context.shape[0], context.shape[1])])
        ctx = self.text_embedding(padded[None].to(self.text_embedding[0].weight.dtype))
        ctx = torch.cat([self.img_emb(clip_fea.to(ctx.dtype)), ctx], dim=1).to(dtype)
        return e, e0, ctx

    def embed_audio(self, audio: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        """``[P, frames, window, blocks, ch]`` → per-latent-frame tokens ``[N_t, P * context_tokens, out]``."""
        cfg = self.config
        first, later = window_audio_per_latent_frame(audio.to(dtype), cfg.audio_window, cfg.vae_scale)
        tokens = self.audio_proj(first, later)  # [P, N_t, ctx, out]
        people = tokens.shape[0]
        return torch.cat(tokens.split(1), dim=2).squeeze(0).to(dtype), people

    @staticmethod
    def token_masks(ref_target_masks: torch.Tensor, grid: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
        """``[M, h_lat, w_lat]`` → ``[M, h_tok * w_tok]`` boolean-as-float masks at token resolution."""
        _, h, w = grid
        m = F.interpolate(ref_target_masks[None].float(), size=(h, w), mode="nearest")[0]
        return (m > 0).view(m.shape[0], -1).to(dtype)

    def patchify(self, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[16, N_t, h, w]`` + ``[20, N_t, h, w]`` → tokens ``[1, S, dim]``."""
        u = torch.cat([x, y], dim=0).to(dtype)
        u = self.patch_embedding(u[None].to(self.patch_embedding.weight.dtype))
        return u.flatten(2).transpose(1, 2).to(dtype)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[S, prod(patch) * out]`` → ``[out, N_t, h, w]``."""
        c = self.config.out_dim
        u = x[: math.prod(grid)].view(*grid, *self.patch_size, c)
        u = torch.einsum("fhwpqrc->cfphqwr", u)
        return u.reshape(c, *[g * p for g, p in zip(grid, self.patch_size)])

    # ------------------------------------------------------------------ forward
    def embed_inputs(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        contexts: Sequence[torch.Tensor],
        clip_fea: torch.Tensor,
        y: torch.Tensor,
        audios: Sequence[torch.Tensor],
        ref_target_masks: Optional[torch.Tensor] = None,
    ) -> "DiTInputs":
        """Everything the blocks need, for one or several guidance passes of one step.

        The passes share the latent, the timestep, the image conditioning and the masks
        and differ only in text context and audio, so the patch and timestep embeddings
        are computed once. The one preparation of :meth:`forward`, :meth:`forward_branches`
        and the sequence-parallel forward (``multitalk.distributed``), which slices the
        result to its rank's tokens.
        """
        if len(contexts) != len(audios):
            raise ValueError("one audio tensor per context")
        dtype = self.patch_embedding.weight.dtype
        grid = self.token_grid(tuple(x.shape))
        tokens = self.patchify(x, y, dtype)
        embedded = [self.embed_conditions(t, c, clip_fea, dtype) for c in contexts]
        audio_tokens, people = [], []
        for a in audios:
            tok, n = self.embed_audio(a, dtype) if self.has_audio else (None, 0)
            audio_tokens.append(tok)
            people.append(n)
        masks = None
        if max(people) >= 2:
            if ref_target_masks is None or ref_target_masks.shape[0] != max(people) + 1:
                raise ValueError(f"{max(people)} people need ref_target_masks [{max(people) + 1}, h, w] "
                                 f"(persons..., background)")
            masks = self.token_masks(ref_target_masks, grid, dtype)
        return DiTInputs(
            grid=grid, tokens=tokens, e=embedded[0][0], e0=embedded[0][1],
            context=torch.cat([c for _, _, c in embedded], dim=0), audio_tokens=audio_tokens, people=people,
            masks=masks, rotations=self.rope.rotations(grid, tokens.device),
        )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        clip_fea: torch.Tensor,
        y: torch.Tensor,
        audio: torch.Tensor,
        ref_target_masks: Optional[torch.Tensor] = None,
        teacache=None,
        branch: str = "cond",
    ) -> torch.Tensor:
        """One denoiser evaluation; shapes in the module docstring. Returns ``[16, N_t, h, w]`` float32.

        ``teacache`` (a :class:`multitalk.utils.sampler.TeaCache`) may skip the blocks for
        this guidance ``branch`` and reuse the branch's cached residual instead.
        """
        inp = self.embed_inputs(x, t, [context], clip_fea, y, [audio], ref_target_masks)
        tokens = self.run_blocks_cached(inp.tokens, inp.e, inp.e0, inp.rotations, inp.context, inp.audio_tokens[0],
                                        inp.people[0], inp.masks, TokenLayout(inp.grid), teacache, branch)
        out = self.head(tokens, inp.e)
        return self.unpatchify(out[0], inp.grid)

    def forward_branches(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        contexts: Sequence[torch.Tensor],
        clip_fea: torch.Tensor,
        y: torch.Tensor,
        audios: Sequence[torch.Tensor],
        ref_target_masks: Optional[torch.Tensor] = None,
    ) -> list[torch.Tensor]:
        """Several guidance passes of one step as one batch.

        The transformer runs with batch ``len(contexts)``; only the audio cross-attention
        runs per sample (its speaker count may differ: the no-audio pass has one silent
        speaker). Each output equals :meth:`forward` on that pass's inputs. Returns
        ``[16, N_t, h, w]`` float32 per pass, in order.
        """
        inp = self.embed_inputs(x, t, contexts, clip_fea, y, audios, ref_target_masks)
        tokens = inp.tokens.expand(len(contexts), -1, -1).contiguous()
        tokens = self.run_blocks(tokens, inp.e0, inp.rotations, inp.context, inp.audio_tokens, inp.people,
                                 inp.masks, TokenLayout(inp.grid))
        out = self.head(tokens, inp.e)
        return [self.unpatchify(out[i], inp.grid) for i in range(len(contexts))]

    def run_blocks_cached(self, tokens, e, e0, rotations, ctx, audio_tokens, people, masks, layout,
                          teacache=None, branch: str = "cond") -> torch.Tensor:
        """:meth:`run_blocks`, or TeaCache's reuse of this branch's cached residual.

        The decision depends on ``e``/``e0`` only, so sequence-parallel ranks agree on it;
        each caches the residual of the tokens it holds.
        """
        if teacache is None:
            return self.run_blocks(tokens, e0, rotations, ctx, audio_tokens, people, masks, layout)
        if teacache.should_compute(branch, e0 if teacache.use_ret_steps else e):
            out = self.run_blocks(tokens, e0, rotations, ctx, audio_tokens, people, masks, layout)
            teacache.residuals[branch] = out - tokens
            return out
        return tokens + teacache.residuals[branch]

    def run_blocks(self, tokens, e0, rotations, ctx, audio_tokens, people, masks, layout) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens, e0, rotations, ctx, audio_tokens, people, masks, layout)
        return tokens
