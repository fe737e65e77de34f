"""Speakers: boxes found from the faces, up to four people, and each speaker's audio routed
to their own box (fixtures from ../shared)."""
from __future__ import annotations

import io
import subprocess

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from multitalk.api import GenerationRequest, InputError, SamplingOptions
from multitalk.modules.audio_adapter import AudioCrossAttention, lrope_layout, lrope_positions
from multitalk.utils.faces import Face, detect_faces, speaker_boxes


def _image(fixtures_dir, name: str) -> Image.Image:
    return Image.open(fixtures_dir / name).convert("RGB")


def _video_frame(fixtures_dir) -> Image.Image:
    import imageio_ffmpeg

    raw = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i",
                          str(fixtures_dir / "video" / "ref_video.mp4"), "-frames:v", "1", "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "pipe:1"], capture_output=True, check=True).stdout
    return Image.fromarray(np.frombuffer(raw, np.uint8).reshape(458, 458, 3))


def _row_of(images: list[Image.Image]) -> Image.Image:
    """The pictures side by side (the second mirrored): a group of their people."""
    height = max(im.height for im in images)
    row = Image.new("RGB", (sum(im.width for im in images), height))
    left = 0
    for i, im in enumerate(images):
        row.paste(im.transpose(Image.FLIP_LEFT_RIGHT) if i % 2 else im, (left, 0))
        left += im.width
    return row


def _contains(box, face: Face) -> bool:
    return box[0] <= face.r0 and box[1] <= face.c0 and box[2] >= face.r1 and box[3] >= face.c1


def _overlap(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _check_boxes(boxes, faces):
    assert all(_contains(box, face) for box, face in zip(boxes, faces)), (boxes, faces)
    assert not any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), boxes


@pytest.mark.fixtures
def test_boxes_from_the_faces_of_the_fixtures(fixtures_dir):
    multi = _image(fixtures_dir, "multi1/multi1.png")
    single = _image(fixtures_dir, "single/single1.png")
    cases = [(multi, 2), (single, 1), (_video_frame(fixtures_dir), 1), (_row_of([multi, multi]), 4),
             (_row_of([single, multi]), 3)]
    for image, people in cases:
        faces = detect_faces(image)
        assert len(faces) == people, (image.size, faces)
        boxes = speaker_boxes(faces, people, (image.height, image.width))
        by_column = sorted(faces, key=lambda f: f.centre_col)
        _check_boxes(boxes, by_column)  # speaker k is the k-th face from the left
        # a head-and-upper-body box: a face height below the chin (or to the picture's bottom)
        assert all(b[2] >= min(image.height, 2 * f.r1 - f.r0) for b, f in zip(boxes, by_column))
    # the official example's two people: the boxes land on the official ones' halves
    boxes = speaker_boxes(detect_faces(multi), 2, (multi.height, multi.width))
    assert boxes[0][3] < multi.width / 2 < boxes[1][1]
    # speaker_order: speaker 1 is the second face from the left
    assert speaker_boxes(detect_faces(multi), 2, (multi.height, multi.width), order=[2, 1]) == boxes[::-1]
    with pytest.raises(InputError) as e:
        speaker_boxes(detect_faces(multi), 2, (multi.height, multi.width), order=[1, 1])
    assert e.value.field == "speaker_order"
    with pytest.raises(InputError) as e:  # fewer faces than speakers
        speaker_boxes(detect_faces(single), 2, (single.height, single.width))
    assert e.value.field == "bbox" and "1 face found" in e.value.message
    no_face = Image.fromarray(np.tile(np.linspace(0, 255, 320, dtype=np.uint8)[None, :, None], (240, 1, 3)))
    with pytest.raises(InputError) as e:
        speaker_boxes(detect_faces(no_face), 2, (240, 320))
    assert e.value.field == "bbox" and "no face" in e.value.message


def test_neighbouring_boxes_are_cut_apart_between_the_faces():
    # Two faces close together: the grown boxes overlap and are cut in the gap between them.
    faces = [Face(100, 100, 200, 180, 0.9), Face(110, 220, 210, 300, 0.9)]
    boxes = speaker_boxes(faces, 2, (600, 600))
    _check_boxes(boxes, faces)
    assert boxes[0][3] == boxes[1][1] == 200  # the middle of the gap (180, 220)
    # One face above the other (a person standing behind one sitting): cut between the rows.
    stacked = [Face(50, 100, 150, 180, 0.9), Face(200, 110, 300, 190, 0.9)]
    boxes = speaker_boxes(stacked, 2, (600, 600))
    _check_boxes(boxes, sorted(stacked, key=lambda f: f.centre_col))
    with pytest.raises(InputError) as e:  # faces on top of each other cannot be told apart
        speaker_boxes([Face(100, 100, 200, 180, 0.9), Face(150, 150, 250, 230, 0.8)], 2, (600, 600))
    assert e.value.field == "bbox"


def test_lrope_layout_keeps_two_people_and_spreads_more():
    assert lrope_layout(2) == (((0.0, 4.0), (20.0, 24.0)), 12.0)  # the official ranges
    for people in (3, 4):
        ranges, background = lrope_layout(people)
        assert ranges[0] == (0.0, 4.0) and ranges[-1] == (20.0, 24.0) and len(ranges) == people
        assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))  # disjoint, in order
        assert not any(lo <= background <= hi for lo, hi in ranges)
    assert lrope_layout(4)[1] == 12.0 and lrope_layout(3)[1] == 7.0


@pytest.mark.parametrize("people", [2, 3, 4])
def test_each_speakers_audio_reaches_their_own_box(people):
    """Boxes → masks → L-RoPE positions → the audio cross-attention: with queries and keys
    that carry position only, every video token inside speaker k's box takes speaker k's
    audio tokens (the value of speaker k's audio), and no other speaker's."""
    from multitalk.modules.transformer_multitalk import MultiTalkTransformer3DModel
    from multitalk.utils.image import masks_to_latent, speaker_masks

    height, width = 160, 64 * people
    boxes = [[20, 64 * k + 8, 150, 64 * k + 56] for k in range(people)]
    masks = speaker_masks(height, width, people, boxes)
    assert masks.shape == (people + 1, height, width)
    for k, (r0, c0, r1, c1) in enumerate(boxes):
        assert masks[k, r0:r1, c0:c1].all() and masks[k].sum() == (r1 - r0) * (c1 - c0)
    grid = (2, 10, 4 * people)  # 2 latent frames of 10 x 4P tokens (latent 20 x 8P, pixels 160 x 64P)
    latent = masks_to_latent(masks, (height, width), (2 * grid[1], 2 * grid[2]))
    token_masks = MultiTalkTransformer3DModel.token_masks(latent, grid, torch.float32)  # [P+1, h*w]
    ref_map = token_masks.repeat(1, grid[0])  # every frame's token attends to its own class
    ref_map = ref_map + 0.01 * torch.arange(ref_map.shape[1]) / ref_map.shape[1]  # distinct scores

    dim, context, audio_dim = 16, 4, people
    attn = AudioCrossAttention(dim, audio_dim, num_heads=1)
    pair = torch.zeros(dim)
    pair[4] = 40.0  # only the RoPE pair of frequency 0.1: phase differences stay below pi over [0, 24]
    with torch.no_grad():
        attn.q_linear.weight.zero_()
        attn.q_linear.bias.copy_(pair)
        attn.kv_linear.weight.zero_()
        attn.kv_linear.bias.zero_()
        attn.kv_linear.bias[:dim].copy_(pair)  # keys: the same vector at every audio token
        attn.kv_linear.weight[dim:dim + people, :people] = torch.eye(people)  # values: which speaker
        attn.proj.weight.copy_(torch.eye(dim))
        attn.proj.bias.zero_()
    speaker_tokens = torch.eye(people).repeat_interleave(context, dim=0)  # [P * context, P]
    audio = speaker_tokens[None].repeat(grid[0], 1, 1)
    tokens = grid[1] * grid[2]
    x = torch.zeros(1, grid[0] * tokens, dim)
    with torch.no_grad():
        out = attn(x, audio, grid[0], people, ref_map)[0, :, :people]  # [S, P]: how much of each speaker
    ranges, background = lrope_layout(people)
    positions = lrope_positions(ref_map, ranges, background)
    for k in range(people):
        inside = token_masks[k].repeat(grid[0]).bool()
        assert inside.any()
        lo, hi = ranges[k]
        assert ((positions[inside] >= lo) & (positions[inside] <= hi)).all()
        assert out[inside].argmax(dim=1).eq(k).all(), out[inside]
        assert out[inside, k].min() > 0.9  # speaker k's audio, hardly any other's


def _wav(seconds: float, pitch: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * np.sin(2 * np.pi * pitch * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32),
                    16000, format="WAV")
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
@pytest.mark.fixtures
def test_two_three_and_four_speaker_jobs_without_boxes_complete(tiny_pipeline, fixtures_dir):
    """Jobs without bbox on tiny weights: the boxes come from the faces and are reported."""
    multi = _image(fixtures_dir, "multi1/multi1.png")
    single = _image(fixtures_dir, "single/single1.png")
    for image, people, audio_type in ((multi, 2, "add"), (_row_of([single, multi]), 3, "add"),
                                      (_row_of([multi, multi]), 4, "para")):
        seconds = 0.9 if audio_type == "para" else 0.9 / people
        request = GenerationRequest(image=_png(image), audio=[_wav(seconds, 180 + 40 * k) for k in range(people)],
                                    audio_type=audio_type, size="multitalk-64", frames=17,
                                    sampling=SamplingOptions(steps=1), color_correction=0.0)
        result = tiny_pipeline.generate(request)
        assert result.num_frames == 17 and result.boxes_source == "faces" and len(result.boxes) == people
        _check_boxes(result.boxes, sorted(detect_faces(image), key=lambda f: f.centre_col))


@pytest.mark.fixtures
def test_the_boxes_used_are_in_the_job_status_and_the_runpod_output(tmp_path, fixtures_dir):
    """Served path without models: the job's real input preparation (faces found at submit and
    at run time), the result mapped into the status (native and RunPod)."""
    from fakes import VIDEO, wait_state
    from inputs import make

    from multitalk.api import GenerationResult
    from multitalk.driver import prepare_inputs

    async def prepare_only(request, stages, progress=None, limits=None, on_chunk=None):
        prep = prepare_inputs(request, limits)
        return GenerationResult(VIDEO, 17, 25, 64, 48, 1, True, boxes=prep.boxes, boxes_source=prep.boxes_source)

    client, _, store = make(tmp_path, generate_fn=prepare_only)
    store.put("multi1.png", (fixtures_dir / "multi1" / "multi1.png").read_bytes())
    multi = _image(fixtures_dir, "multi1/multi1.png")
    expected = speaker_boxes(detect_faces(multi), 2, (multi.height, multi.width))
    with client:
        r = client.post("/v1/jobs", json={"image": "multi1.png", "audio": ["1.wav", "2.wav"], "frames": 17})
        assert r.status_code == 202, r.text
        status = wait_state(client, r.json()["id"])
        assert status["state"] == "COMPLETED", status
        assert status["result"]["boxes"] == expected and status["result"]["boxes_source"] == "faces"
        r = client.post("/run", json={"input": {"audio_1": "1.wav", "audio_2": "2.wav", "condition_image": "multi1.png",
                                                "frames": 17, "speaker_order": [2, 1]}})
        job = r.json()["id"]
        wait_state(client, job)
        output = client.get(f"/status/{job}").json()["output"]
        assert output["boxes"] == expected[::-1] and output["boxes_source"] == "faces"
