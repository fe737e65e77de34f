"""Loading never holds a second full copy of the DiT in RAM (issue 8, memory levers).

Writes a mid-size DiT (random weights, official layout: sharded safetensors plus
``multitalk.safetensors``), then loads it in a fresh process with the service's loader
(``load_dit``: built on ``meta``, filled tensor by tensor) and reports

    peak memory growth during the load / bytes of the loaded model

(RSS, and anonymous memory alone: memory-mapped checkpoint pages are page cache, not a
copy) next to the same ratios for the naive way (``torch.nn.Module`` built with random init, then
``load_state_dict`` of a full ``safetensors.torch.load_file`` dict), side by side in one run.
About 1.0 means one copy (the model's own tensors); about 2 or more, two copies at once.
Runs without Ray and without a GPU.

    python bench/load_memory.py                   # ~0.8 GB checkpoint (dim 1024, 12 layers)
    python bench/load_memory.py --dim 512 --layers 4
"""
from __future__ import annotations

import argparse
import json
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dtype", default="float32", help="model dtype (the file is float32)")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "ROOT", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    import torch

    from multitalk.checkpoints.dit import save_dit
    from multitalk.checkpoints.tiny import tiny_dit_config
    from multitalk.modules.transformer_multitalk import MultiTalkTransformer3DModel

    cfg = dict(tiny_dit_config(), dim=args.dim, ffn_dim=4 * args.dim, num_heads=max(1, args.dim // 64),
               num_layers=args.layers)
    with tempfile.TemporaryDirectory(prefix="bench-load-") as root:
        with torch.device("meta"):
            model = MultiTalkTransformer3DModel(**cfg)
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        adapter_cfg = {k: cfg[k] for k in ("intermediate_dim", "output_dim", "context_tokens", "audio_blocks",
                                           "audio_channels")}
        save_dit(model, Path(root) / "dit", "official", Path(root) / "adapter", shards=4, adapter_config=adapter_cfg)
        del model
        file_bytes = sum(f.stat().st_size for f in Path(root).rglob("*.safetensors"))
        rows = {}
        for mode in ("ours", "naive"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, root, args.dtype],
                                 check=True, capture_output=True, text=True).stdout
            rows[mode] = json.loads(out.strip().splitlines()[-1])
    print(json.dumps({"checkpoint_gb": round(file_bytes / 1e9, 3), "dtype": args.dtype,
                      "model_gb": round(rows["ours"]["model_bytes"] / 1e9, 3)}))
    print(f"{'loader':>8} {'peak RSS growth GB':>19} {'x model':>8} {'peak anonymous growth GB':>25} {'x model':>8}")
    for mode, r in rows.items():
        growth, anon = r["peak"] - r["rss_before"], r["anon_peak"] - r["anon_before"]
        print(f"{mode:>8} {growth / 1e9:19.3f} {growth / r['model_bytes']:8.2f} {anon / 1e9:25.3f} "
              f"{anon / r['model_bytes']:8.2f}")


if __name__ == "__main__":
    main()
