"""Sequence parallelism (Ulysses, optionally Ulysses x ring) for the MultiTalk DiT.

One interface: :class:`SequenceParallel` is configured with a ``torch.distributed``
process group whose size is the SP degree (``ulysses_degree * ring_degree``).
``parallelize(model)`` swaps every block's self-attention kernel for a Ulysses all-to-all
kernel and installs the two-person reference-map hook; :func:`sp_forward` (or
``SequenceParallel.forward``) is then a drop-in for ``model.forward`` that every rank of
the group calls with the same full inputs and that returns the full output on every rank.

How the sequence is split (why it matches the serial model exactly):

* Tokens are frame-major, so the token sequence is split **by whole latent frames**:
  rank ``r`` holds a contiguous run of frames. Frame counts need not divide evenly
  (81 video frames give N_t = 21 latent frames): the first ``N_t % world`` ranks get one
  frame more. No zero frames are added to the model's sequence, so nothing spurious
  enters attention. Each rank needs at least one frame (``N_t >= world``, else
  ``ValueError``).
* Self-attention is the only op that mixes tokens across frames. The Ulysses kernel pads
  each rank's chunk to the longest chunk (the all-to-all needs equal sizes), exchanges
  sequence chunks for head chunks, **drops the padding** so attention runs over exactly
  the ``S`` real tokens for ``H / ulysses_degree`` heads, then re-pads and exchanges back.
* Everything else is per token or per latent frame: text/image cross-attention, FFN,
  head; the audio cross-attention gets the rank's frames and those frames' audio tokens.
* Multi-person L-RoPE: the reference frame (latent frame 0) always lives on rank 0, whose
  reference keys are broadcast to the group; each rank computes its queries' map against
  them, and the per-person (min, max) used to scale the map into RoPE positions is
  all-reduced so every rank scales exactly like the serial model.

Attention comm backends (``backend=``):

* ``"yunchang"``: yunchang's ``SeqAllToAll4D`` (the all-to-all of its ``UlyssesAttention``,
  xfuser's base library; runs over gloo on CPU) with the model's own local attention
  kernel between the exchanges.
* ``"torch"``: the same exchange written with ``torch.distributed.all_to_all_single``
  (fallback when yunchang does not import).
* ``"xfuser"``: xfuser's ``xFuserLongContextAttention`` (CUDA; needs xfuser's parallel
  state initialised by the caller). Used for even splits only; uneven splits fall back to
  the padded yunchang/torch exchange. Untested here (no GPU).
* ``"auto"`` (default): xfuser on CUDA when importable and initialised, else yunchang,
  else torch.

``ring_degree > 1`` uses yunchang's ``LongContextAttention`` (Ulysses x ring); it needs the
group to be the default (world) group, yunchang, CUDA and an even split of tokens. The CPU
tests run it over gloo with a reference block kernel standing in for the CUDA one.

The module is Ray-free: it only needs ``torch.distributed``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..modules.attention import AttentionKernel
from ..modules.audio_adapter import reference_attention_map
from ..modules.transformer_multitalk import MultiTalkTransformer3DModel, TokenLayout

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "yunchang", "torch", "xfuser")


# --------------------------------------------------------------------------- validation
def validate_sp_degrees(num_heads: int, ulysses_degree: int, ring_degree: int = 1,
                        world_size: Optional[int] = None) -> None:
    """Raise ``ValueError`` unless the degrees fit the model and the process group.

    Ulysses gives each rank ``num_heads / ulysses_degree`` whole heads, so the degree must
    divide the head count (40 for the 14B model: 1, 2, 4, 5, 8, 10, 20, 40).
    """
    if ulysses_degree < 1 or ring_degree < 1:
        raise ValueError(f"ulysses_degree ({ulysses_degree}) and ring_degree ({ring_degree}) must be >= 1")
    if num_heads % ulysses_degree:
        valid = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"ulysses_degree {ulysses_degree} does not divide the model's {num_heads} attention heads; "
            f"Ulysses sequence parallelism splits whole heads across ranks, so use one of {valid} "
            f"(and put the rest of the GPUs into ring_degree)"
        )
    if world_size is not None and ulysses_degree * ring_degree != world_size:
        raise ValueError(
            f"ulysses_degree * ring_degree = {ulysses_degree} * {ring_degree} = {ulysses_degree * ring_degree} "
            f"must equal the process group size {world_size}"
        )


@dataclass(frozen=True)
class FrameSplit:
    """Which latent frames / tokens each rank holds for one forward.

    ``frames[r]`` latent frames go to rank ``r`` (contiguous, in order); each frame has
    ``tokens_per_frame`` tokens.
    """

    frames: tuple[int, ...]
    tokens_per_frame: int

    @classmethod
    def even_as_possible(cls, num_frames: int, world_size: int, tokens_per_frame: int) -> "FrameSplit":
        if num_frames < world_size:
            raise ValueError(
                f"sequence parallelism over {world_size} ranks needs at least {world_size} latent frames "
                f"(one per rank), got {num_frames}"
            )
        base, extra = divmod(num_frames, world_size)
        return cls(tuple(base + (r < extra) for r in range(world_size)), tokens_per_frame)

    @property
    def token_lengths(self) -> tuple[int, ...]:
        return tuple(f * self.tokens_per_frame for f in self.frames)

    @property
    def even(self) -> bool:
        return len(set(self.frames)) == 1

    def frame_range(self, rank: int) -> tuple[int, int]:
        start = sum(self.frames[:rank])
        return start, start + self.frames[rank]

    def token_range(self, rank: int) -> tuple[int, int]:
        f0, f1 = self.frame_range(rank)
        return f0 * self.tokens_per_frame, f1 * self.tokens_per_frame


# --------------------------------------------------------------------------- all-to-all
def _torch_seq_to_heads(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """``[B, S, H, D]`` (rank's sequence chunk, all heads) → ``[B, world*S, H/world, D]``."""
    b, s, h, d = x.shape
    send = x.reshape(b, s, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()  # [W, B, S, h, D]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[r]: rank r's sequence chunk, my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(b, world * s, h // world, d)


def _torch_heads_to_seq(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """``[B, world*S, h, D]`` (full sequence, my heads) → ``[B, S, world*h, D]``."""
    b, ws, h, d = x.shape
    s = ws // world
    send = x.reshape(b, world, s, h, d).permute(1, 0, 2, 3, 4).contiguous()  # [W, B, S, h, D]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[r]: my sequence chunk, rank r's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s, world * h, d)


def _yunchang_available() -> bool:
    try:
        from yunchang.comm.all_to_all import SeqAllToAll4D  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def _xfuser_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:  # pragma: no cover - CUDA only
        from xfuser.core.distributed import model_parallel_is_initialized
        from xfuser.core.long_ctx_attention import xFuserLongContextAttention  # noqa: F401

        return bool(model_parallel_is_initialized())
    except Exception:
        return False


def resolve_backend(backend: str) -> str:
    """``"auto"`` → the best available of xfuser (CUDA) / yunchang / torch; checks the name."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown sequence-parallel backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if _xfuser_ready():
            return "xfuser"
        return "yunchang" if _yunchang_available() else "torch"
    if backend == "yunchang" and not _yunchang_available():
        raise ValueError("backend 'yunchang' requested but `import yunchang` fails (pip install yunchang)")
    if backend == "xfuser" and not _xfuser_ready():
        raise ValueError("backend 'xfuser' needs CUDA, xfuser, and xfuser's model-parallel state initialised")
    return backend


# --------------------------------------------------------------------------- kernels
class UlyssesAttention:
    """Ulysses self-attention kernel: ``(q, k, v) [1, S_local, H, D] -> [1, S_local, H, D]``.

    Scatter heads / gather sequence, attend over the full sequence for ``H / world``
    heads with ``local_attention``, then exchange back. Ranks may hold different numbers
    of tokens (``sp.token_lengths``, set per forward by :func:`sp_forward`); chunks are
    padded for the exchange and the padding is removed before attention, so the result
    equals full attention exactly.
    """

    def __init__(self, sp: "SequenceParallel", local_attention: AttentionKernel):
        self.sp = sp
        self.local_attention = local_attention
        self._xfuser_kernel = None

    def __repr__(self) -> str:
        return f"UlyssesAttention(world={self.sp.world_size}, backend={self.sp.backend!r}, local={self.local_attention!r})"

    def _exchange(self, x: torch.Tensor, to_heads: bool) -> torch.Tensor:
        sp = self.sp
        if sp.world_size == 1:
            return x
        if sp.backend in ("yunchang", "xfuser") and _yunchang_available():
            from yunchang.comm.all_to_all import SeqAllToAll4D

            scatter, gather = (2, 1) if to_heads else (1, 2)
            return SeqAllToAll4D.apply(sp.group, x, scatter, gather, False)
        fn = _torch_seq_to_heads if to_heads else _torch_heads_to_seq
        return fn(x, sp.group, sp.world_size)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        sp = self.sp
        local_len = q.shape[1]
        lengths = sp.token_lengths or (local_len,) * sp.world_size
        if lengths[sp.rank] != local_len:
            raise RuntimeError(f"rank {sp.rank} holds {local_len} tokens but the split says {lengths[sp.rank]}")
        even = len(set(lengths)) == 1
        # One dtype for the exchange (the local kernel casts q, k to v's dtype anyway).
        q, k = q.to(v.dtype), k.to(v.dtype)

        if even and sp.backend == "xfuser":  # pragma: no cover - CUDA only
            if self._xfuser_kernel is None:
                from xfuser.core.long_ctx_attention import xFuserLongContextAttention

                self._xfuser_kernel = xFuserLongContextAttention()
            return self._xfuser_kernel(None, query=q, key=k, value=v)

        longest = max(lengths)
        qkv = torch.cat([q, k, v], dim=0)  # [3, S_local, H, D]: one exchange instead of three
        if local_len < longest:
            qkv = torch.cat([qkv, qkv.new_zeros(3, longest - local_len, *qkv.shape[2:])], dim=1)
        full = self._exchange(qkv, to_heads=True)  # [3, world*longest, H/world, D]
        if not even:
            keep = torch.cat([torch.arange(r * longest, r * longest + n) for r, n in enumerate(lengths)])
            full = full.index_select(1, keep.to(full.device))
        out = self.local_attention(full[0:1], full[1:2], full[2:3])  # [1, S, H/world, D]
        if not even:
            padded = out.new_zeros(1, len(lengths) * longest, *out.shape[2:])
            padded[:, keep.to(out.device)] = out
            out = padded
        out = self._exchange(out.contiguous(), to_heads=False)  # [1, longest, H, D]
        return out[:, :local_len]


class RingUlyssesAttention:
    """Ulysses x ring via yunchang's ``LongContextAttention``; even token splits only.

    Each ring step attends to one block of keys/values with a kernel that returns the
    log-sum-exp, and the blocks are merged by it: flash-attention's kernel when
    ``flash_attn`` is installed, else PyTorch's memory-efficient SDPA kernel (CUDA only)."""

    def __init__(self, sp: "SequenceParallel"):
        from yunchang import LongContextAttention
        from yunchang.kernels import AttnType

        attn_type = RING_ATTN_TYPE
        if attn_type is None:
            if not torch.cuda.is_available():
                raise ValueError("ring_degree > 1 needs CUDA (yunchang's ring kernels); use ulysses_degree only")
            attn_type = AttnType.FA if _flash_attn_available() else AttnType.TORCH_EFFICIENT
        self.sp = sp
        self.kernel = LongContextAttention(ring_impl_type="basic", attn_type=attn_type)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        lengths = self.sp.token_lengths
        if lengths is not None and len(set(lengths)) != 1:
            raise ValueError(
                f"ring_degree > 1 needs every rank to hold the same number of tokens, got {lengths}; "
                f"choose a latent frame count divisible by {self.sp.world_size}"
            )
        q, k = q.to(v.dtype), k.to(v.dtype)
        return self.kernel(q, k, v)


# The ring's block kernel (a yunchang ``AttnType``); None: chosen by :class:`RingUlyssesAttention`.
RING_ATTN_TYPE = None


def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
        return True
    except ImportError:
        return False


# --------------------------------------------------------------------------- the interface
class SequenceParallel:
    """Sequence-parallel configuration of one group of ranks for one DiT.

    Args:
        group: the process group of the SP ranks (``None``: the default/world group). Its
            size must be ``ulysses_degree * ring_degree``.
        ulysses_degree: ranks that split heads (must divide the model's head count);
            defaults to the group size.
        ring_degree: ranks that pass key/value blocks around a ring (default 1).
        backend: ``"auto"``, ``"yunchang"``, ``"torch"`` or ``"xfuser"`` (module docstring).
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, ulysses_degree: Optional[int] = None,
                 ring_degree: int = 1, backend: str = "auto"):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("SequenceParallel needs torch.distributed initialised (dist.init_process_group)")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ring_degree = ring_degree
        self.ulysses_degree = self.world_size // ring_degree if ulysses_degree is None else ulysses_degree
        if self.ulysses_degree * ring_degree != self.world_size:
            raise ValueError(
                f"ulysses_degree * ring_degree = {self.ulysses_degree} * {ring_degree} must equal the process "
                f"group size {self.world_size}"
            )
        self.backend = resolve_backend(backend)
        if ring_degree > 1:
            if not _yunchang_available():
                raise ValueError("ring_degree > 1 needs yunchang (pip install yunchang)")
            if group not in (None, dist.group.WORLD):
                raise ValueError("ring_degree > 1 runs on the world group only (yunchang keeps global groups)")
        # Global rank of group rank 0: it holds latent frame 0, the reference frame.
        self.reference_src = dist.get_global_rank(group, 0) if group is not None else 0
        self.token_lengths: Optional[tuple[int, ...]] = None  # set per forward by sp_forward

    # ---------------------------------------------------------------- model surgery
    def parallelize(self, model: MultiTalkTransformer3DModel) -> MultiTalkTransformer3DModel:
        """Swap every block's self-attention kernel and install the reference-map hook (in place)."""
        validate_sp_degrees(model.config.num_heads, self.ulysses_degree, self.ring_degree, self.world_size)
        if getattr(model, "sequence_parallel", None) is not None:
            raise ValueError("model is already parallelized; call unparallelize(model) first")
        if self.ring_degree > 1:
            from yunchang import set_seq_parallel_pg

            set_seq_parallel_pg(self.ulysses_degree, self.ring_degree, dist.get_rank(), dist.get_world_size())
        for block in model.blocks:
            local = block.self_attn.attention
            block.self_attn._serial_attention = local
            block.self_attn.attention = (
                RingUlyssesAttention(self) if self.ring_degree > 1 else UlyssesAttention(self, local)
            )
            block.ref_map_fn = self.reference_map
        model.sequence_parallel = self
        return model

    def unparallelize(self, model: MultiTalkTransformer3DModel) -> MultiTalkTransformer3DModel:
        """Undo :meth:`parallelize` (serial kernels back, hooks removed)."""
        for block in model.blocks:
            if hasattr(block.self_attn, "_serial_attention"):
                block.self_attn.attention = block.self_attn._serial_attention
                del block.self_attn._serial_attention
            block.ref_map_fn = None
        model.sequence_parallel = None
        return model

    # ---------------------------------------------------------------- hooks
    @torch.no_grad()
    def reference_map(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout,
                      ref_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's ``ref_map_fn``: the people's reference map for this rank's tokens.

        Args:
            q, k: this rank's roped queries/keys ``[1, S_local, H, D]``.
            layout: the rank's :class:`TokenLayout` (frame 0 = first ``h*w`` tokens of rank 0).
            ref_masks: ``[P + 1, h*w]`` token masks of the reference frame (persons, background).
        Returns:
            ``(ref_map [P + 1, S_local], value_range [P, 2])``: value_range holds (min, max)
            per person over *all* ranks' tokens.
        """
        _, h, w = layout.grid
        ref_k = k[:, : h * w].contiguous() if self.rank == 0 else k.new_empty(1, h * w, *k.shape[2:])
        if self.world_size > 1:
            dist.broadcast(ref_k, src=self.reference_src, group=self.group)
        ref_map = reference_attention_map(q, k, layout.grid, ref_masks, ref_k=ref_k)
        lows = ref_map[:-1].min(dim=1).values.contiguous()
        highs = ref_map[:-1].max(dim=1).values.contiguous()
        if self.world_size > 1:
            dist.all_reduce(lows, op=dist.ReduceOp.MIN, group=self.group)
            dist.all_reduce(highs, op=dist.ReduceOp.MAX, group=self.group)
        return ref_map, torch.stack([lows, highs], dim=1)

    # ---------------------------------------------------------------- forward
    def gather_tokens(self, local: torch.Tensor, split: FrameSplit) -> torch.Tensor:
        """``[1, S_local, C]`` per rank → ``[1, S, C]`` on every rank (in rank order)."""
        if self.world_size == 1:
            return local
        longest = max(split.token_lengths)
        padded = local
        if local.shape[1] < longest:
            padded = torch.cat([local, local.new_zeros(1, longest - local.shape[1], local.shape[2])], dim=1)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([p[:, :n] for p, n in zip(parts, split.token_lengths)], dim=1)

    @torch.no_grad()
    def forward(self, model: MultiTalkTransformer3DModel, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                clip_fea: torch.Tensor, y: torch.Tensor, audio: torch.Tensor,
                ref_target_masks: Optional[torch.Tensor] = None, teacache=None, branch: str = "cond") -> torch.Tensor:
        """Same inputs and result as ``model.forward`` (see its docstring for shapes);
        every rank of the group calls it with the same inputs and gets the full
        ``[16, N_t, h, w]`` float32 velocity back."""
        if getattr(model, "sequence_parallel", None) is not self:
            raise ValueError("call SequenceParallel.parallelize(model) before the parallel forward")
        inp = model.embed_inputs(x, t, [context], clip_fea, y, [audio], ref_target_masks)
        grid = inp.grid
        split = FrameSplit.even_as_possible(grid[0], self.world_size, grid[1] * grid[2])
        start, stop = split.token_range(self.rank)
        frame_start, frame_stop = split.frame_range(self.rank)
        # Embedding runs on every rank: cheap next to the blocks, and it saves a scatter.
        tokens = inp.tokens[:, start:stop]
        audio_tokens = inp.audio_tokens[0]
        if audio_tokens is not None:
            audio_tokens = audio_tokens[frame_start:frame_stop]  # the rank's latent frames only
        layout = TokenLayout(grid, start, stop - start)
        rotations = inp.rotations[start:stop]
        e, e0, ctx, people, masks = inp.e, inp.e0, inp.context, inp.people[0], inp.masks

        self.token_lengths = split.token_lengths
        try:
            tokens = model.run_blocks_cached(tokens, e, e0, rotations, ctx, audio_tokens, people, masks, layout,
                                             teacache, branch)
        finally:
            self.token_lengths = None
        out = model.head(tokens, e)  # [1, S_local, prod(patch) * out_dim] float32
        out = self.gather_tokens(out, split)
        return model.unpatchify(out[0], grid)


def sp_forward(model: MultiTalkTransformer3DModel, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
               clip_fea: torch.Tensor, y: torch.Tensor, audio: torch.Tensor,
               ref_target_masks: Optional[torch.Tensor] = None, teacache=None, branch: str = "cond") -> torch.Tensor:
    """Parallel drop-in for ``model.forward`` on a model prepared by ``SequenceParallel.parallelize``.

    Returns the full velocity ``[16, N_t, h, w]`` float32 on every rank.
    """
    sp = getattr(model, "sequence_parallel", None)
    if sp is None:
        raise ValueError("model is not parallelized; call SequenceParallel(group).parallelize(model) first")
    return sp.forward(model, x, t, context, clip_fea, y, audio, ref_target_masks, teacache, branch)
