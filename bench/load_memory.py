"""Loading never holds a second full copy of the DiT in RAM (issue 8, memory levers; issue 12).

Writes a DiT (random weights, official layout: sharded safetensors plus
``multitalk.safetensors``), then loads it in a fresh process with the service's loader
(``load_dit``: built on ``meta``, filled tensor by tensor) and reports

    peak memory growth during the load / bytes of the loaded model
    peak memory growth during the load / bytes of the largest file (shard or adapter)

(RSS, and anonymous memory alone: memory-mapped checkpoint pages are page cache, not a
copy) next to the same ratios for the naive way (``torch.nn.Module`` built with random init, then
``load_state_dict`` of a full ``safetensors.torch.load_file`` dict), side by side in one run.
About 1.0 x model means one copy (the model's own tensors); about 2 or more, two copies at once.
The files are written one shard at a time (``--shard-gb``), so writing a checkpoint larger
than RAM's comfort never holds more than a shard either. Runs without Ray and without a GPU.

    python bench/load_memory.py                   # ~0.8 GB checkpoint (dim 1024, 12 layers)
    python bench/load_memory.py --dim 512 --layers 4
    # the largest this 24 GiB machine holds under ~8 GB RSS, real conditioning/adapter widths,
    # bf16 and then fp32 files, both into a bf16 model (ours only: the naive way needs 2x):
    python bench/load_memory.py --dim 2048 --layers 32 --real-widths --file-dtype bfloat16 --dtype bfloat16 --no-naive
    python bench/load_memory.py --dim 2048 --layers 32 --real-widths --file-dtype float32 --dtype bfloat16 --no-naive
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _anon_bytes() -> int:
    # Anonymous memory only: file pages of memory-mapped checkpoints are page cache (shared,
    # evictable) and show up in RSS while mapped, but are not a copy held by this process.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class AnonPeak:
    """Samples anonymous RSS every few milliseconds in a thread; ``peak`` is the highest seen."""

    def __init__(self, interval_s: float = 0.002):
        import threading

        self.peak, self._stop = _anon_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.peak = max(self.peak, _anon_bytes())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_bytes())


def child(mode: str, root: str, dtype: str) -> None:
    """Measure one load in this (fresh) process; prints JSON."""
    import torch

    from multitalk.checkpoints.dit import ADAPTER_CONFIG_FILE, load_dit
    from multitalk.modules.transformer_multitalk import MultiTalkTransformer3DModel

    torch_dtype = getattr(torch, dtype)
    base = Path(root) / "dit"
    adapter = Path(root) / "adapter" / "multitalk.safetensors"
    from safetensors.torch import load_file  # imported before the baseline, as load_dit's own imports

    before, anon_before = _rss_bytes(), _anon_bytes()
    sampler = AnonPeak().__enter__()
    if mode == "ours":
        model = load_dit(base, "official", adapter, dtype=torch_dtype)
    else:  # the naive way: random init, then a full state dict per file
        cfg = {k: v for k, v in json.loads((base / "config.json").read_text()).items() if not k.startswith("_")}
        cfg.update(json.loads(adapter.with_name(ADAPTER_CONFIG_FILE).read_text()))
        model = MultiTalkTransformer3DModel(**cfg, audio_adapter=True).to(torch_dtype)
        state = {}
        for f in sorted(base.glob("*.safetensors")) + [adapter]:
            state.update(load_file(str(f)))
        model.load_state_dict(state)
        del state
    sampler.__exit__()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"mode": mode, "rss_before": before, "peak": _peak_bytes(), "model_bytes": params,
                      "anon_before": anon_before, "anon_peak": sampler.peak}))


REAL_WIDTHS = dict(text_dim=4096, image_dim=1280, audio_blocks=12, audio_channels=768, intermediate_dim=512,
                   output_dim=768, context_tokens=32)  # the 14B model's conditioning and adapter widths
_ADAPTER_KEYS = ("intermediate_dim", "output_dim", "context_tokens", "audio_blocks", "audio_channels")


def write_random_dit(root: Path, cfg: dict, file_dtype, shard_bytes: int) -> list[Path]:
    """The official layout (``dit/`` shards + index + config, ``adapter/multitalk.safetensors``)
    with random weights, written one shard at a time. Returns the files written."""
    import torch
    from safetensors.torch import save_file

    from multitalk.checkpoints.dit import ADAPTER_CONFIG_FILE, ADAPTER_FILE, is_adapter_key
    from multitalk.modules.transformer_multitalk import MultiTalkTransformer3DModel

    with torch.device("meta"):
        model = MultiTalkTransformer3DModel(**cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    base = [k for k in shapes if not is_adapter_key(k)]
    item = torch.empty((), dtype=file_dtype).element_size()
    groups, current, size = [], [], 0
    for k in base:
        current.append(k)
        size += math.prod(shapes[k]) * item
        if size >= shard_bytes:
            groups.append(current)
            current, size = [], 0
    groups += [current] if current else []
    gen = torch.Generator().manual_seed(0)

    def tensors(keys):
        return {k: (torch.randn(shapes[k], generator=gen) * 0.02).to(file_dtype) for k in keys}

    dit, adapter_dir = root / "dit", root / "adapter"
    dit.mkdir(parents=True)
    adapter_dir.mkdir(parents=True)
    files, weight_map = [], {}
    for i, keys in enumerate(groups):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors(keys), str(dit / name), metadata={"format": "pt"})  # one shard in RAM at a time
        weight_map.update({k: name for k in keys})
        files.append(dit / name)
    (dit / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {"_class_name": "WanModel", "model_type": "i2v",
              **{k: cfg[k] for k in ("dim", "ffn_dim", "num_heads", "num_layers", "freq_dim", "text_dim", "image_dim")}}
    (dit / "config.json").write_text(json.dumps(config))
    save_file(tensors([k for k in shapes if is_adapter_key(k)]), str(adapter_dir / ADAPTER_FILE), metadata={"format": "pt"})
    (adapter_dir / ADAPTER_CONFIG_FILE).write_text(json.dumps({k: cfg[k] for k in _ADAPTER_KEYS}))
    files.append(adapter_dir / ADAPTER_FILE)
    return files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dtype", default="float32", help="model dtype")
    ap.add_argument("--file-dtype", default="float32", help="dtype of the checkpoint files (the real shards: float32)")
    ap.add_argument("--shard-gb", type=float, default=0.0, help="target shard size (default: 4 shards)")
    ap.add_argument("--real-widths", action="store_true", help="the 14B model's text/image/audio widths")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive loader (it needs two copies)")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "ROOT", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    import torch

    from multitalk.checkpoints.tiny import tiny_dit_config
    from multitalk.modules.transformer_multitalk import MultiTalkTransformer3DModel

    cfg = dict(tiny_dit_config(), dim=args.dim, ffn_dim=4 * args.dim, num_heads=max(1, args.dim // 64),
               num_layers=args.layers)
    if args.real_widths:
        cfg.update(REAL_WIDTHS, num_heads=max(1, args.dim // 128))
    file_dtype = getattr(torch, args.file_dtype)
    with torch.device("meta"):
        params = sum(p.numel() for p in MultiTalkTransformer3DModel(**cfg).parameters())
    shard_bytes = int(args.shard_gb * 1e9) if args.shard_gb else -(-params * file_dtype.itemsize // 4)
    with tempfile.TemporaryDirectory(prefix="bench-load-") as root:
        files = write_random_dit(Path(root), cfg, file_dtype, shard_bytes)
        file_bytes = sum(f.stat().st_size for f in files)
        largest = max(f.stat().st_size for f in files)
        rows = {}
        for mode in ("ours",) + (() if args.no_naive else ("naive",)):
            out = subprocess.run([sys.executable, __file__, "--child", mode, root, args.dtype],
                                 check=True, capture_output=True, text=True).stdout
            rows[mode] = json.loads(out.strip().splitlines()[-1])
    print(json.dumps({"checkpoint_gb": round(file_bytes / 1e9, 3), "file_dtype": args.file_dtype, "dtype": args.dtype,
                      "files": len(files), "largest_file_gb": round(largest / 1e9, 3), "params_b": round(params / 1e9, 3),
                      "model_gb": round(rows["ours"]["model_bytes"] / 1e9, 3)}))
    print(f"{'loader':>8} {'peak RSS growth GB':>19} {'x model':>8} {'peak anonymous growth GB':>25} {'x model':>8}")
    for mode, r in rows.items():
        growth, anon = r["peak"] - r["rss_before"], r["anon_peak"] - r["anon_before"]
        print(f"{mode:>8} {growth / 1e9:19.3f} {growth / r['model_bytes']:8.2f} {anon / 1e9:25.3f} "
              f"{anon / r['model_bytes']:8.2f}")
    for mode, r in rows.items():
        growth, anon = r["peak"] - r["rss_before"], r["anon_peak"] - r["anon_before"]
        print(f"{mode}: peak RSS growth = {growth / largest:.2f} x the largest file, peak anonymous growth = "
              f"{anon / largest:.2f} x the largest file; absolute peak RSS {r['peak'] / 1e9:.3f} GB")


if __name__ == "__main__":
    main()
