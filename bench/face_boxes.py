"""What finding the speaker boxes costs per condition image (multitalk.utils.faces).

For each image: decoding it (``load_image``, which every job pays already) and finding the
faces and boxes (``detect_faces`` + ``speaker_boxes``), each the median of ``--repeat``
runs measured side by side, and their ratio. Images: the fixtures (``multi1.png``,
``single1.png``, the first frame of ``ref_video.mp4``) and groups of three and four people
made from them side by side.

    .venv/bin/python bench/face_boxes.py [--fixtures ../shared/fixtures] [--repeat 9]

Prints one line per image and a JSON summary (``--json FILE`` writes it too). Timings on
a shared machine are noisy: compare the ratio, not the milliseconds.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _images(fixtures: Path) -> list[tuple[str, bytes, int]]:
    import imageio_ffmpeg
    from PIL import Image

    multi, single = (fixtures / "multi1" / "multi1.png").read_bytes(), (fixtures / "single" / "single1.png").read_bytes()
    raw = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i",
                          str(fixtures / "video" / "ref_video.mp4"), "-frames:v", "1", "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "pipe:1"], capture_output=True, check=True).stdout
    frame = Image.fromarray(np.frombuffer(raw, np.uint8).reshape(458, 458, 3))

    def row(*parts):
        ims = [Image.open(io.BytesIO(p)).convert("RGB") for p in parts]
        out = Image.new("RGB", (sum(i.width for i in ims), max(i.height for i in ims)))
        left = 0
        for k, im in enumerate(ims):
            out.paste(im.transpose(Image.FLIP_LEFT_RIGHT) if k % 2 else im, (left, 0))
            left += im.width
        return _png(out)

    return [("multi1.png", multi, 2), ("single1.png", single, 1), ("ref_video frame 0", _png(frame), 1),
            ("3 people (single1 + multi1)", row(single, multi), 3), ("4 people (multi1 x 2)", row(multi, multi), 4)]


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    from multitalk.utils.faces import detect_faces, speaker_boxes
    from multitalk.utils.image import load_image

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixtures", default=str(REPO.parent / "shared" / "fixtures"))
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--json")
    args = p.parse_args()

    rows = []
    print(f"{'image':30s} {'size':>11s} faces  decode_ms  boxes_ms  boxes/decode")
    for name, data, people in _images(Path(args.fixtures)):
        image = load_image(data)
        detect_faces(image)  # first call: the library loads its filters
        decode = _median_ms(lambda: load_image(data), args.repeat)
        boxes = _median_ms(lambda: speaker_boxes(detect_faces(image), people, (image.height, image.width)),
                           args.repeat)
        found = len(detect_faces(image))
        rows.append({"image": name, "width": image.width, "height": image.height, "people": people, "faces": found,
                     "decode_ms": round(decode, 1), "boxes_ms": round(boxes, 1), "ratio": round(boxes / decode, 2)})
        print(f"{name:30s} {image.width:5d}x{image.height:<5d} {found:5d} {decode:10.1f} {boxes:9.1f} "
              f"{boxes / decode:13.2f}")
    summary = {"repeat": args.repeat, "images": rows,
               "boxes_ms_median": statistics.median(r["boxes_ms"] for r in rows)}
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
