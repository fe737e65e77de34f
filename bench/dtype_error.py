"""Each stage's error in its production dtype against fp32, on the tiny weights (issue 12).

For every stage the same tiny random weights (``multitalk make-tiny-weights``, official
layout) run once in fp32 and once in the dtype named; the error is the relative L2 error of
the stage's output, ``||out - out_fp32|| / ||out_fp32||``, and the largest absolute error.
The official's dtypes on CUDA (:mod:`multitalk.precision`): wav2vec2 fp32, CLIP fp16, UMT5
bf16, DiT bf16, VAE fp32; the rows after them are the alternatives (e.g. the bf16 wav2vec2
the production config used before, and, as the floor, the fp32 features merely rounded to
the DiT's bf16, which is what the official itself does to the audio windows).

Runs on the CPU (bf16 and fp16 kernels exist there for every op these models use, unless
the table says otherwise). Inputs: the fixture speech and image when ``../shared/fixtures``
is there, else seeded random ones.

    python bench/dtype_error.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm()), float((out - ref).abs().max())


def _inputs(fixtures: Path):
    gen = torch.Generator().manual_seed(0)
    wav = fixtures / "multi1" / "1.wav"
    if wav.exists():
        from multitalk.utils.audio import load_speech

        speech = load_speech(wav.read_bytes())[: 16000 * 4]
    else:
        speech = torch.randn(16000 * 4, generator=gen).numpy() * 0.1
    png = fixtures / "multi1" / "multi1.png"
    if png.exists():
        from multitalk.utils.image import load_image, resize_and_center_crop

        pixels = resize_and_center_crop(load_image(png.read_bytes()), (128, 224))
    else:
        pixels = torch.rand(3, 128, 224, generator=gen) * 2 - 1
    return np.asarray(speech, dtype=np.float32), pixels


def rows(root: Path, fixtures: Path) -> list[tuple[str, str, float, float, str]]:
    from multitalk.checkpoints.tiny import tiny_dit_inputs
    from multitalk.stages import AudioStage, DecodeStage, DiffusionStage, ImageStage, TextStage

    speech, pixels = _inputs(fixtures)
    out = []

    def add(stage, dtype, production, fn_ref, fn, note=""):
        try:
            e = rel_err(fn(), fn_ref)
            out.append((stage, f"{str(dtype).replace('torch.', '')}{' (official)' if production else ''}", *e, note))
        except Exception as exc:  # a dtype the CPU lacks a kernel for
            out.append((stage, str(dtype).replace("torch.", ""), float("nan"), float("nan"), f"fails on CPU: {exc}"[:90]))

    audio_ref = AudioStage.from_pretrained(root, "cpu", FP32).encode([speech])
    add("audio (wav2vec2)", FP32, True, audio_ref, lambda: audio_ref)
    add("audio (wav2vec2)", BF16, False, audio_ref, lambda: AudioStage.from_pretrained(root, "cpu", BF16).encode([speech]),
        "the previous production config")
    add("audio (wav2vec2)", "fp32->bf16", False, audio_ref, lambda: audio_ref.to(BF16).float(),
        "fp32 features rounded to bf16, as the official casts the windows")
    add("audio (wav2vec2)", FP16, False, audio_ref, lambda: AudioStage.from_pretrained(root, "cpu", FP16).encode([speech]))

    prompt = "a man and a woman are talking in a studio"
    text_ref = TextStage.from_pretrained(root, "cpu", FP32).encode(prompt, "").context
    add("text (UMT5)", BF16, True, text_ref, lambda: TextStage.from_pretrained(root, "cpu", BF16).encode(prompt, "").context)
    add("text (UMT5)", FP16, False, text_ref, lambda: TextStage.from_pretrained(root, "cpu", FP16).encode(prompt, "").context)

    cond = pixels[:, None]  # [3, 1, H, W]
    image_ref = ImageStage.from_pretrained(root, "cpu", FP32, vae_dtype=FP32).encode(cond, 9)
    add("image (CLIP)", FP16, True, image_ref.clip_features,
        lambda: ImageStage.from_pretrained(root, "cpu", FP16, vae_dtype=FP32).encode(cond, 9).clip_features)
    add("image (CLIP)", BF16, False, image_ref.clip_features,
        lambda: ImageStage.from_pretrained(root, "cpu", BF16, vae_dtype=FP32).encode(cond, 9).clip_features)
    add("image (VAE encode)", FP32, True, image_ref.cond_latents, lambda: image_ref.cond_latents)
    add("image (VAE encode)", BF16, False, image_ref.cond_latents,
        lambda: ImageStage.from_pretrained(root, "cpu", FP32, vae_dtype=BF16).encode(cond, 9).cond_latents)

    latents = image_ref.cond_latents[4:]  # [16, N_t, h, w]: a realistic latent to decode
    decode_ref = DecodeStage.from_pretrained(root, "cpu", FP32).decode(latents)
    add("decode (VAE)", FP32, True, decode_ref, lambda: decode_ref)
    add("decode (VAE)", BF16, False, decode_ref, lambda: DecodeStage.from_pretrained(root, "cpu", BF16).decode(latents))

    inp = tiny_dit_inputs(2)

    def dit(dtype):
        stage = DiffusionStage.from_pretrained(root, "cpu", dtype)
        with torch.no_grad():
            return stage.model(**{k: (v.to(dtype) if v.is_floating_point() and k not in ("t", "x") else v)
                                  for k, v in inp.items()}).float()

    dit_ref = dit(FP32)
    add("diffusion (DiT, one pass)", BF16, True, dit_ref, lambda: dit(BF16))
    add("diffusion (DiT, one pass)", FP16, False, dit_ref, lambda: dit(FP16))
    return out


def main() -> None:
    from multitalk.checkpoints.tiny import make_tiny_weights

    fixtures = REPO.parent / "shared" / "fixtures"
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-dtype-") as tmp:
        root = make_tiny_weights(Path(tmp) / "tiny", "official", seed=0)
        table = rows(root, fixtures)
    print(f"{'stage':28} {'dtype':24} {'rel L2 err':>11} {'max abs err':>12}  note")
    for stage, dtype, rel, mx, note in table:
        print(f"{stage:28} {dtype:24} {rel:11.2e} {mx:12.2e}  {note}")


if __name__ == "__main__":
    main()
