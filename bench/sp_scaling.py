"""Sequence-parallel DiT: parallel vs serial agreement and time per denoiser step.

CPU (default): 2 gloo ranks on the tiny random DiT; prints the max abs difference between
the parallel and the serial output and the parallel/serial time ratio. On a small shared
CPU the ratio measures overhead (all-to-all through gloo), not speed-up.

CUDA (``--device cuda``, needs >= ``--world`` GPUs): nccl ranks, one GPU each, a random
DiT of the given width/depth in bf16 at the given latent size; prints per-step times.
Untested on this machine (no GPU).

No Ray: ranks are plain processes (``multitalk.distributed.launch.spawn_ranks``).

    python bench/sp_scaling.py                                  # CPU, tiny model, 2 ranks
    python bench/sp_scaling.py --device cuda --world 8 --dim 5120 --heads 40 --layers 40 \\
        --latent-frames 21 --height 60 --width 104              # 480p x 81 frames, 14B shape
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from multitalk.checkpoints.tiny import tiny_dit, tiny_dit_config  # noqa: E402
from multitalk.distributed import SequenceParallel, sp_forward  # noqa: E402
from multitalk.distributed.launch import spawn_ranks  # noqa: E402
from multitalk.modules.transformer_multitalk import MultiTalkTransformer3DModel  # noqa: E402


def make_inputs(args, device, dtype):
    """Random DiT inputs: x ``[16, N_t, h, w]``, y ``[20, N_t, h, w]``, audio ``[P, F, 5, B, C]`` ..."""
    cfg = tiny_dit_config() if args.dim is None else {**tiny_dit_config(), **_big_overrides(args)}
    g = torch.Generator().manual_seed(0)
    t_lat, h, w = args.latent_frames, args.height, args.width
    frames = 1 + 4 * (t_lat - 1)
    masks = torch.zeros(3, h, w)
    masks[0, :, : w // 2 - 1] = 1
    masks[1, :, w // 2 + 1 :] = 1
    masks[2] = 1 - masks[0] - masks[1]
    inp = dict(
        x=torch.randn(16, t_lat, h, w, generator=g),
        t=torch.tensor([811.0]),
        context=torch.randn(7, cfg["text_dim"], generator=g),
        clip_fea=torch.randn(1, 257, cfg["image_dim"], generator=g),
        y=torch.randn(20, t_lat, h, w, generator=g),
        audio=torch.randn(args.people, frames, 5, cfg["audio_blocks"], cfg["audio_channels"], generator=g),
        ref_target_masks=masks,
    )
    return {k: (v.to(device) if k in ("t", "ref_target_masks") else v.to(device, dtype)) for k, v in inp.items()}


def _big_overrides(args) -> dict:
    return dict(dim=args.dim, num_heads=args.heads, num_layers=args.layers, ffn_dim=int(args.dim * 2.7))


def make_model(args, device, dtype):
    if args.dim is None:
        model = tiny_dit(0)
    else:
        torch.manual_seed(0)
        model = MultiTalkTransformer3DModel(**{**tiny_dit_config(), **_big_overrides(args)}).eval()
    if device.type == "cpu" and dtype == torch.float32:
        return model  # already there; .to() would only make diffusers warn
    return model.to(device, dtype)


def _timed(fn, steps: int, device, barrier: bool = True) -> tuple[torch.Tensor, float]:
    """Mean seconds per call after one warm-up call; ``barrier``: line the ranks up first."""
    import torch.distributed as dist

    out = fn()  # warm-up
    if barrier:
        dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / steps


def rank_main(rank: int, world_size: int, args, result_path: str) -> None:
    import torch.distributed as dist

    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = make_model(args, device, dtype)
    inp = make_inputs(args, device, dtype)
    with torch.no_grad():
        # Serial baseline: rank 0 alone (the others idle at the barrier), same threads/GPU.
        serial, serial_s = None, float("nan")
        if rank == 0:
            serial, serial_s = _timed(lambda: model(**inp), args.steps, device, barrier=False)
        dist.barrier()
        SequenceParallel(None, ulysses_degree=world_size, backend=args.backend).parallelize(model)
        parallel, parallel_s = _timed(lambda: sp_forward(model, **inp), args.steps, device)
    if rank == 0:
        diff = (parallel.float() - serial.float()).abs().max().item()
        torch.save(dict(diff=diff, serial_s=serial_s, parallel_s=parallel_s,
                        backend=model.sequence_parallel.backend), result_path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--world", type=int, default=2, help="sequence-parallel degree (ranks)")
    p.add_argument("--backend", default="auto", help="auto | yunchang | torch | xfuser")
    p.add_argument("--latent-frames", type=int, default=5)
    p.add_argument("--height", type=int, default=8, help="latent height (pixels / 8)")
    p.add_argument("--width", type=int, default=12, help="latent width (pixels / 8)")
    p.add_argument("--people", type=int, choices=(1, 2), default=2)
    p.add_argument("--steps", type=int, default=3, help="timed forwards (after one warm-up)")
    p.add_argument("--dim", type=int, default=None, help="random DiT width instead of the tiny one")
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--threads-per-rank", type=int, default=1)
    args = p.parse_args(argv)

    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        if gpus < args.world:
            print(f"--device cuda needs {args.world} GPUs, found {gpus}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.pt")
        spawn_ranks(rank_main, args.world, args, path, backend="nccl" if args.device == "cuda" else "gloo",
                    threads_per_rank=args.threads_per_rank)
        r = torch.load(path)
    size = f"{args.latent_frames}x{args.height}x{args.width} latents, {args.people} people"
    model = "tiny DiT" if args.dim is None else f"DiT dim={args.dim} heads={args.heads} layers={args.layers}"
    print(f"{model}, {size}, device={args.device}, sp={args.world} ({r['backend']})")
    print(f"max |parallel - serial| = {r['diff']:.3e}")
    print(f"serial   {r['serial_s'] * 1e3:9.1f} ms/step")
    print(f"parallel {r['parallel_s'] * 1e3:9.1f} ms/step  (parallel/serial time ratio {r['parallel_s'] / r['serial_s']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
