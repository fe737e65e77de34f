"""LoRA per request: unmerged at run time vs merge on switch, side by side on one CPU.

    .venv/bin/python bench/lora_switch.py [--dim 2048 --layers 2 --rank 64 --grid 4 16 32]

Builds a MultiTalk DiT of width ``--dim`` (ffn 2.7x, head dim 128, real audio/image widths)
with random weights, and two LoRA files shaped like the lightx2v distillation LoRAs: a
rank-``--rank`` pair on every block linear (self/cross/audio attention and FFN), ``diff_b``
on their biases and ``diff`` on the norm weights. Then, on the same inputs:

* ``plain``: the base model, no LoRA machinery;
* ``unmerged``: :class:`multitalk.modules.lora_runtime.LoraRuntime`, the library's path:
  idle (hooks installed, no set active) and with LoRA A active;
* ``merge on switch`` (:class:`MergeOnSwitch`, defined here, measured only): ``W += s·B·A``
  into the weights when the set changes, exact restore from kept originals first.

Prints the switch times (none→A, A→B, B→none) and seconds per DiT forward (one guidance
pass; a step is 2-3) of each, the numeric agreement of the two mechanisms, the exactness
of the restore, and an extrapolation to the 14B model (stated as such).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multitalk.checkpoints.lora import LoraFile, merge_lora, read_lora  # noqa: E402
from multitalk.modules.lora_runtime import LoraRuntime  # noqa: E402
from multitalk.modules.transformer_multitalk import MultiTalkTransformer3DModel  # noqa: E402

REAL = dict(dim=5120, ffn_dim=13824, num_layers=40, output_dim=768)  # multitalk-14B
REAL_480P_TOKENS = 21 * 30 * 52  # 81 frames at 480x832: 21 latent frames of 60x104 latents, 2x2 patches
CONTEXT_TOKENS = {"text": 512, "image": 257}


# --------------------------------------------------------------------------- the other mechanism
class MergeOnSwitch:
    """Merge a set into the weights when it changes; restore exactly before the next one.

    Exactness: the first time a parameter is merged its untouched value is copied aside
    (here: CPU memory); a switch copies every kept original back before merging the new
    set, so the weights after ``A → B`` are bit for bit those of a fresh ``B`` merge, and
    ``→ none`` gives back the loaded base. (Un-merging by subtracting ``s·B·A`` again is not
    exact in bf16 or fp32: rounding of ``W + Δ`` loses bits of ``W``.) Memory: one copy of
    every adapted weight — for a LoRA on all block linears, all of the DiT.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.params = dict(model.named_parameters())
        self.originals: dict[str, torch.Tensor] = {}
        self.current: tuple = ()

    @torch.no_grad()
    def activate(self, lora_set: tuple[tuple[LoraFile, float], ...]) -> None:
        for name, original in self.originals.items():
            self.params[name].copy_(original)
        for lora, scale in lora_set:
            for delta in lora.deltas:
                if delta.param not in self.originals:
                    self.originals[delta.param] = self.params[delta.param].detach().to("cpu", copy=True)
            merge_lora(self.model, lora, scale)
        self.current = lora_set

    @property
    def original_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.originals.values())


# --------------------------------------------------------------------------- model, LoRA, inputs
def build_model(dim: int, layers: int, seed: int = 0) -> MultiTalkTransformer3DModel:
    torch.manual_seed(seed)
    ffn = int(round(2.7 * dim / 128)) * 128
    model = MultiTalkTransformer3DModel(dim=dim, ffn_dim=ffn, num_heads=dim // 128, num_layers=layers, text_dim=512,
                                        audio_blocks=2, audio_channels=64, output_dim=768)
    return model.eval()


def save_distill_like_lora(model, path: Path, rank: int, seed: int) -> Path:
    """Rank-``rank`` pairs on every block linear, ``diff_b`` on their biases, ``diff`` on norms."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        key = "diffusion_model." + name
        if name.startswith("blocks.") and isinstance(module, torch.nn.Linear):
            out_f, in_f = module.weight.shape
            tensors[key + ".lora_down.weight"] = torch.randn(rank, in_f, generator=gen) / in_f**0.5
            tensors[key + ".lora_up.weight"] = 0.02 * torch.randn(out_f, rank, generator=gen) / rank**0.5
            tensors[key + ".alpha"] = torch.tensor(float(rank))
            if module.bias is not None:
                tensors[key + ".diff_b"] = 0.01 * torch.randn(out_f, generator=gen)
        elif name.startswith("blocks.") and name.endswith(("norm3", "norm_q", "norm_k")) and \
                getattr(module, "weight", None) is not None:
            tensors[key + ".diff"] = 0.01 * torch.randn(module.weight.shape, generator=gen)
    save_file(tensors, str(path))
    return path


def make_inputs(model, grid: tuple[int, int, int], seed: int = 0) -> dict:
    t_lat, h, w = grid
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    frames = 1 + 4 * (t_lat - 1)
    masks = torch.zeros(3, h, w)
    masks[0, :, : w // 2 - 1] = 1
    masks[1, :, w // 2 + 1:] = 1
    masks[2] = 1 - masks[0] - masks[1]
    return dict(
        x=torch.randn(16, t_lat, h, w, generator=g), t=torch.tensor([811.0]),
        context=torch.randn(CONTEXT_TOKENS["text"], cfg.text_dim, generator=g),
        clip_fea=torch.randn(1, CONTEXT_TOKENS["image"], cfg.image_dim, generator=g),
        y=torch.randn(20, t_lat, h, w, generator=g),
        audio=torch.randn(1, frames, 5, cfg.audio_blocks, cfg.audio_channels, generator=g),
        ref_target_masks=masks,
    )


def timed(fn) -> float:
    _sync()
    started = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - started


def second_of_two(fn) -> float:
    """Time the second of two runs: the first after a switch pays page faults for the
    memory the switch freed (glibc hands big blocks back), which would bias the order."""
    fn()
    return timed(fn)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- extrapolation
def adapted_linears(dim: int, ffn: int, audio_out: int, tokens: int, audio_tokens: int) -> list[tuple[int, int, int]]:
    """(in, out, tokens it runs on) of each adapted linear of one block, per forward."""
    video, text, image = tokens, CONTEXT_TOKENS["text"], CONTEXT_TOKENS["image"]
    return ([(dim, dim, video)] * 4                                           # self q k v o
            + [(dim, dim, video), (dim, dim, text), (dim, dim, text), (dim, dim, video),
               (dim, dim, image), (dim, dim, image)]                            # cross q k v o k_img v_img
            + [(dim, ffn, video), (ffn, dim, video)]                            # ffn
            + [(dim, dim, video), (audio_out, 2 * dim, audio_tokens), (dim, dim, video)])  # audio q kv proj


def lora_cost(dim: int, ffn: int, layers: int, rank: int, tokens: int, audio_tokens: int, audio_out: int = 768):
    """Adapted parameters, base FLOPs per forward (adapted linears + attention), the LoRA's
    extra FLOPs, and the activation bytes
    the unmerged path adds (bf16: read x for ``x·A``, read and write the output in addmm)."""
    params = base_flops = extra_flops = extra_bytes = 0
    for fan_in, fan_out, n in adapted_linears(dim, ffn, audio_out, tokens, audio_tokens):
        params += fan_in * fan_out
        base_flops += 2 * n * fan_in * fan_out
        extra_flops += 2 * n * rank * (fan_in + fan_out)
        extra_bytes += 2 * n * (fan_in + 2 * fan_out)
    # attention: QK^T and PV over the video tokens (self) and the text + image tokens (cross)
    base_flops += 4 * tokens * tokens * dim + 4 * tokens * (CONTEXT_TOKENS["text"] + CONTEXT_TOKENS["image"]) * dim
    return dict(params=params * layers, base_flops=base_flops * layers, extra_flops=extra_flops * layers,
                extra_bytes=extra_bytes * layers, lora_params=layers * sum(rank * (i + o) for i, o, _ in
                                                                          adapted_linears(dim, ffn, audio_out, 1, 1)))


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--grid", type=int, nargs=3, default=[4, 16, 32], metavar=("T", "H", "W"),
                    help="latent grid (tokens = T*H*W/4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="e.g. cuda, to check the GPU estimate when one is lent")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    plain = build_model(args.dim, args.layers)
    if args.device != "cpu" or dtype != torch.float32:
        plain = plain.to(args.device, dtype)
    unmerged_model = copy.deepcopy(plain)
    inputs = {k: v.to(args.device) for k, v in make_inputs(plain, tuple(args.grid)).items()}
    tokens = args.grid[0] * args.grid[1] * args.grid[2] // 4
    tmp = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    path_a = save_distill_like_lora(plain, tmp / "a.safetensors", args.rank, seed=1)
    path_b = save_distill_like_lora(plain, tmp / "b.safetensors", args.rank, seed=2)
    lora_a, lora_b = read_lora(plain, path_a), read_lora(plain, path_b)
    print(f"model: dim {args.dim}, {args.layers} layers, {sum(p.numel() for p in plain.parameters()) / 1e6:.0f}M "
          f"params fp32; {tokens} video tokens; LoRA rank {args.rank}, {len(lora_a.deltas)} deltas, "
          f"{lora_a.nbytes / 1e6:.0f} MB; {args.device} {args.dtype}, {args.threads} threads")

    runtime = LoraRuntime(unmerged_model, args.device, dtype)
    runtime.register("a", path_a)
    runtime.register("b", path_b)
    merging = MergeOnSwitch(plain)

    with torch.no_grad():
        reference = plain(**inputs)
        runtime.activate([("a", 1.0)])
        merging.activate(((lora_a, 1.0),))
        out_unmerged_a, out_merged_a = unmerged_model(**inputs), plain(**inputs)
        runtime.activate([("b", 1.0)])
        merging.activate(((lora_b, 1.0),))
        runtime.activate(())
        merging.activate(())
        exact_unmerged = torch.equal(unmerged_model(**inputs), reference)
        exact_merged = torch.equal(plain(**inputs), reference)
        original_bytes = merging.original_bytes

        # Interleaved repeats, so machine load drifts hit every case alike; each case keeps
        # its fastest time (on a shared machine other load only ever adds time), and each
        # forward is timed warm (second_of_two).
        steps = {"none→A": ((("a", 1.0),), ((lora_a, 1.0),)), "A→B": ((("b", 1.0),), ((lora_b, 1.0),)),
                 "B→none": ((), ())}
        switch = {"unmerged": {k: [] for k in steps}, "merge on switch": {k: [] for k in steps}}
        cases = {"plain": [], "unmerged idle": [], "unmerged, A active": [], "merged A (merge on switch)": []}
        for _ in range(args.repeats):
            for step, (spec, files) in steps.items():
                switch["unmerged"][step].append(timed(lambda: runtime.activate(spec)))
                switch["merge on switch"][step].append(timed(lambda: merging.activate(files)))
            cases["plain"].append(second_of_two(lambda: plain(**inputs)))
            cases["unmerged idle"].append(second_of_two(lambda: unmerged_model(**inputs)))
            runtime.activate([("a", 1.0)])
            merging.activate(((lora_a, 1.0),))
            cases["unmerged, A active"].append(second_of_two(lambda: unmerged_model(**inputs)))
            cases["merged A (merge on switch)"].append(second_of_two(lambda: plain(**inputs)))
            runtime.activate(())
            merging.activate(())
        switch = {mech: {k: min(v) for k, v in row.items()} for mech, row in switch.items()}

    agree = ((out_unmerged_a - out_merged_a).abs().max() / out_merged_a.abs().max()).item()
    lora_effect = ((out_merged_a - reference).abs().max() / reference.abs().max()).item()
    print(f"\nswitch time (s, best of {args.repeats})   none→A    A→B     B→none")
    for mech, row in switch.items():
        print(f"  {mech:<24} {row['none→A']:7.3f} {row['A→B']:7.3f} {row['B→none']:8.3f}")
    # The fastest of the repeats: on a shared machine, other load only ever adds time.
    print("\nseconds per DiT forward (best of %d; median)       best vs plain" % args.repeats)
    base = min(cases["plain"])
    for name, times in cases.items():
        print(f"  {name:<32} {min(times):7.3f} ({statistics.median(times):7.3f})   "
              f"{100 * (min(times) / base - 1):+5.1f} %")
    print(f"\nunmerged vs merged output with A: max rel diff {agree:.2e} (LoRA's own effect {lora_effect:.2e})")
    print(f"after B→none, output equals the plain model bit for bit: unmerged {exact_unmerged}, "
          f"merge on switch {exact_merged}")
    print(f"merge on switch keeps originals of {original_bytes / 1e9:.2f} GB ({args.dtype} here)")
    extrapolate(args, tokens, base, min(cases["unmerged, A active"]), switch)


def extrapolate(args, tokens: int, base_s: float, active_s: float, switch: dict) -> None:
    ffn = int(round(2.7 * args.dim / 128)) * 128
    audio_tokens = 32 * args.grid[0]
    here = lora_cost(args.dim, ffn, args.layers, args.rank, tokens, audio_tokens)
    measured = active_s / base_s - 1
    flop_share = here["extra_flops"] / here["base_flops"]
    print("\nEXTRAPOLATION to multitalk-14B (dim 5120, ffn 13824, 40 layers, 480p 81 frames = "
          f"{REAL_480P_TOKENS} tokens), not measured:")
    print(f"  here the LoRA adds {100 * flop_share:.1f} % to the forward's FLOPs and costs "
          f"{100 * measured:+.1f} % per forward")
    for rank in sorted({32, 64, args.rank}):
        real = lora_cost(REAL["dim"], REAL["ffn_dim"], REAL["num_layers"], rank, REAL_480P_TOKENS, 32 * 21)
        share = real["extra_flops"] / real["base_flops"]
        scaled = measured * share / flop_share if flop_share > 0 else float("nan")
        gpu_bytes_s = real["extra_bytes"] / 3.35e12  # H100 HBM3, bf16 activations
        print(f"  rank {rank:3d}: +{100 * share:.1f} % FLOPs; per forward "
              f"{100 * scaled:+.1f} % (this CPU's ratio scaled by FLOPs) ; on an H100 the skinny LoRA matmuls "
              f"are bandwidth-bound: ≥ {gpu_bytes_s:.3f} s of extra HBM traffic per forward "
              f"(≈ {100 * gpu_bytes_s / 2.6:.1f} % of LightX2V's ≈ 2.6 s/pass); LoRA weights "
              f"{real['lora_params'] * 2 / 1e9:.2f} GB bf16")
    real = lora_cost(REAL["dim"], REAL["ffn_dim"], REAL["num_layers"], args.rank, REAL_480P_TOKENS, 32 * 21)
    here_params = here["params"]
    merge_per_param = switch["merge on switch"]["A→B"] / here_params
    print(f"  merge on switch: adapted weights {real['params'] / 1e9:.1f} B params = "
          f"{real['params'] * 2 / 1e9:.0f} GB of bf16 originals kept aside (host RAM); A→B on this CPU would take "
          f"≈ {merge_per_param * real['params']:.0f} s (scaled by parameters); on a GPU the restore is a "
          f"host→device copy of those {real['params'] * 2 / 1e9:.0f} GB: ≈ {real['params'] * 2 / 25e9:.1f} s "
          f"at 25 GB/s (PCIe 4), ≈ {real['params'] * 2 / 50e9:.1f} s at 50 GB/s, plus "
          f"{2 * real['params'] * args.rank / 1e12:.1f} TFLOP of B·A products")
    print(f"  unmerged switch: stacking and copying {real['lora_params'] * 2 / 1e9:.2f} GB of LoRA matrices: "
          f"≈ {real['lora_params'] * 2 / 25e9:.2f} s at 25 GB/s")


if __name__ == "__main__":
    main()
