"""Media handling: speech decoding, image loading / buckets / masks, mp4 writing, colour match."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from multitalk.api import InputError
from multitalk.utils.audio import combine_speakers, load_speech
from multitalk.utils.image import (
    BUCKETS,
    bucket_size,
    bucket_table,
    load_image,
    masks_to_latent,
    resize_and_center_crop,
    speaker_masks,
)
from multitalk.utils.color import ColorTarget, color_match, lab_to_rgb, rgb_to_lab
from multitalk.utils.video import probe_mp4, write_mp4

RATE = 16000


def _loudness(speech: np.ndarray, rate: int = RATE) -> float:
    import pyloudnorm

    return pyloudnorm.Meter(rate).integrated_loudness(speech.astype(np.float64))


def _tone(seconds: float, rate: int = RATE, channels: int = 1, freq: float = 220.0) -> np.ndarray:
    """A speech-level test tone, [N] or [N, channels] float32."""
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.2 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    return mono if channels == 1 else np.stack([mono * (0.5 + 0.5 * c) for c in range(channels)], axis=1)


def _encode(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _raises(expected_field: str, fn, *args, **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    assert info.value.field == expected_field, info.value
    return info.value


# ---------------------------------------------------------------------------------------
# Audio


@pytest.mark.parametrize(
    "data",
    [b"this is not audio at all " * 40, b"\x89PNG\r\n\x1a\n" + b"\0" * 200, bytes(range(256)) * 8],
    ids=["text", "png-magic", "binary"],
)
def test_speech_rejects_non_audio(data):
    _raises("audio_2", load_speech, data, field="audio_2")


def test_speech_rejects_empty_and_header_only():
    _raises("audio_1", load_speech, b"")
    _raises("audio_1", load_speech, _encode(np.zeros(0, np.float32), RATE))


def test_speech_rejects_truncated_wav():
    wav = _encode(_tone(1.0), RATE, subtype="PCM_16")
    error = _raises("audio_1", load_speech, wav[: len(wav) // 2])
    assert "truncated" in error.message
    _raises("audio_1", load_speech, wav[:30])  # cut inside the header


def test_speech_rejects_silence():
    error = _raises("audio_1", load_speech, _encode(np.zeros(RATE, np.float32), RATE))
    assert "silent" in error.message


def test_speech_rejects_too_long_from_header():
    error = _raises("audio_1", load_speech, _encode(_tone(3.0), RATE), max_seconds=2.0)
    assert error.status == 413


def test_speech_8khz_stereo_is_converted():
    speech = load_speech(_encode(_tone(2.0, rate=8000, channels=2), 8000, subtype="PCM_16"))
    assert speech.dtype == np.float32 and speech.ndim == 1
    assert speech.shape[0] == 2 * RATE
    assert _loudness(speech) == pytest.approx(-23.0, abs=0.05)


@pytest.mark.parametrize("fmt", ["FLAC", "OGG", "MP3"])
def test_speech_other_containers(fmt):
    speech = load_speech(_encode(_tone(1.5, rate=44100), 44100, fmt=fmt))
    assert abs(speech.shape[0] - int(1.5 * RATE)) <= 2


def test_speech_from_mp4_audio_track():
    frames = torch.zeros(3, 25, 32, 32)  # 1.0 s at 25 fps
    mp4 = write_mp4(frames, _tone(1.0))
    speech = load_speech(mp4, max_seconds=10)
    assert abs(speech.shape[0] / RATE - 1.0) < 0.05
    assert _loudness(speech) == pytest.approx(-23.0, abs=0.1)
    _raises("audio_1", load_speech, mp4, max_seconds=0.5)
    # A video without sound is not speech.
    error = _raises("audio_1", load_speech, write_mp4(frames, None))
    assert "no audio track" in error.message


def test_fixture_speech_is_loudness_normalised(fixtures_dir):
    for name in ("multi1/1.wav", "multi1/2.wav", "single/1.wav"):
        speech = load_speech((fixtures_dir / name).read_bytes())
        assert speech.dtype == np.float32
        assert _loudness(speech) == pytest.approx(-23.0, abs=0.01), name


def test_combine_speakers():
    first, second = np.ones(3, np.float32), np.full(5, 2.0, np.float32)
    (one,), mixed = combine_speakers([first], "add")
    assert one is first and mixed is first

    (track1, track2), mixed = combine_speakers([first, second], "add")
    np.testing.assert_array_equal(track1, [1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(track2, [0, 0, 0, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(mixed, track1 + track2)

    (track1, track2), mixed = combine_speakers([first, second], "para")
    np.testing.assert_array_equal(track1, [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(track2, second)
    np.testing.assert_array_equal(mixed, [3, 3, 3, 2, 2])

    _raises("audio_type", combine_speakers, [first, second], "mix")


# ---------------------------------------------------------------------------------------
# Image loading


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit all-black PNG of width x height that compresses to almost nothing."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_image_rejects_non_image_empty_and_truncated():
    _raises("condition_image", load_image, b"")
    _raises("condition_image", load_image, b"GIF89a? no, just text" * 10)
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    png = _png(Image.fromarray(noise))
    error = _raises("condition_image", load_image, png[: len(png) // 2])
    assert "truncated" in error.message


def test_image_rejects_decompression_bombs():
    small_bomb = _bomb_png(4000, 4000)
    assert len(small_bomb) < 20_000
    error = _raises("condition_image", load_image, small_bomb, max_pixels=1_000_000)
    assert error.status == 413
    # Over PIL's own hard limit: its DecompressionBombError must surface as InputError.
    error = _raises("condition_image", load_image, _bomb_png(20000, 20000))
    assert error.status == 413


def test_image_rejects_tiny():
    _raises("condition_image", load_image, _png(Image.new("RGB", (200, 40))))


@pytest.mark.parametrize("mode", ["RGBA", "P", "CMYK", "L", "LA", "1", "I;16"])
def test_image_modes_become_rgb(mode):
    if mode == "I;16":
        ramp = np.tile(np.linspace(0, 65535, 96).astype(np.uint16), (80, 1))
        source = Image.fromarray(ramp)
        assert source.mode.startswith("I")
    else:
        source = Image.new("RGB", (96, 80), (200, 30, 90)).convert(mode)
    buffer = io.BytesIO()
    source.save(buffer, format="TIFF" if mode == "CMYK" else "PNG")
    image = load_image(buffer.getvalue())
    assert image.mode == "RGB" and image.size == (96, 80)
    if mode == "I;16":
        values = np.asarray(image)[0, :, 0]
        assert values[0] == 0 and values[-1] == 255  # rescaled, not clipped to white


def test_image_rgba_drops_alpha_like_official():
    rgba = Image.new("RGBA", (80, 80), (10, 20, 30, 0))
    assert np.asarray(load_image(_png(rgba)))[0, 0].tolist() == [10, 20, 30]


def test_image_exif_orientation_applied():
    image = Image.new("RGB", (120, 80), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert load_image(buffer.getvalue()).size == (80, 120)


# ---------------------------------------------------------------------------------------
# Buckets, resize + crop


def test_fixture_image_buckets(fixtures_dir):
    multi = load_image((fixtures_dir / "multi1" / "multi1.png").read_bytes())
    single = load_image((fixtures_dir / "single" / "single1.png").read_bytes())
    assert multi.size == (2560, 1440) and single.size == (2366, 1318)
    # h/w 0.5625 and 0.557: closest keys 0.50 (480 table) and 0.55 (720 table).
    for image in (multi, single):
        assert bucket_size(image.height, image.width, "multitalk-480") == (448, 896)
        assert bucket_size(image.height, image.width, "multitalk-720") == (704, 1280)
        assert bucket_size(image.height, image.width, "multitalk-256") == (176, 352)
        assert bucket_size(image.height, image.width, "multitalk-128") == (96, 176)
    tensor = resize_and_center_crop(multi, (448, 896))
    assert tensor.shape == (3, 448, 896) and tensor.dtype == torch.float32
    assert -1.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0


def test_bucket_tables():
    assert len(BUCKETS["multitalk-480"]) == 15 and len(BUCKETS["multitalk-720"]) == 21
    assert bucket_size(100, 100) == (640, 640)
    assert bucket_size(100, 400) == (320, 1216)  # ratio 0.25 -> key 0.26
    assert bucket_size(1000, 100, "multitalk-720") == (1920, 512)
    for n in (32, 128, 256, 999):
        for h, w in bucket_table(f"multitalk-{n}").values():
            assert h % 16 == 0 and w % 16 == 0 and min(h, w) >= 32
    assert bucket_table("multitalk-640") == BUCKETS["multitalk-480"]
    for bad in ("multitalk-16", "multitalk-abc", "720p", "multitalk-99999"):
        _raises("size", bucket_size, 100, 100, bad)


def test_resize_and_center_crop_matches_official_rule():
    rng = np.random.default_rng(1)
    source = Image.fromarray(rng.integers(0, 256, (101, 300, 3), dtype=np.uint8))
    result = resize_and_center_crop(source, (64, 128))
    # scale = max(64/101, 128/300) = 0.6337 -> ceil: 64 x 191; crop left = round(63/2) = 32
    expected = np.asarray(source.resize((191, 64), resample=Image.BILINEAR))[:, 32:160]
    expected = (torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255 - 0.5) * 2
    assert result.shape == (3, 64, 128)
    torch.testing.assert_close(result, expected)


# ---------------------------------------------------------------------------------------
# Speaker masks

MULTI_BBOX = [[160, 120, 1280, 1080], [160, 1320, 1280, 2280]]


def test_masks_for_multi1_bboxes():
    masks = speaker_masks(1440, 2560, 2, MULTI_BBOX)
    assert masks.shape == (3, 1440, 2560) and masks.dtype == torch.float32
    assert masks[0].sum() == 1120 * 960 and masks[1].sum() == 1120 * 960
    assert masks[2].sum() == 1440 * 2560 - 2 * 1120 * 960
    assert masks[0, 160, 120] == 1 and masks[0, 1279, 1079] == 1 and masks[0, 1280, 1079] == 0
    torch.testing.assert_close(masks.sum(0), torch.ones(1440, 2560))  # disjoint boxes

    latent = masks_to_latent(masks, (448, 896), (56, 112))
    assert latent.shape == (3, 56, 112)
    assert set(latent.unique().tolist()) <= {0.0, 1.0}
    assert latent[0, :, :56].sum() > 0 and latent[0, :, 56:].sum() == 0
    assert latent[1, :, 56:].sum() > 0 and latent[1, :, :56].sum() == 0
    # The official dict form gives the same masks.
    same = speaker_masks(1440, 2560, 2, {"person1": MULTI_BBOX[0], "person2": MULTI_BBOX[1]})
    assert torch.equal(same, masks)


def test_default_masks_and_single_speaker():
    masks = speaker_masks(100, 200, 2)
    # rows int(100*0.05)=5 .. int(100*0.95)=95; columns half=100: 5..95 and 105..195
    expected = torch.zeros(2, 100, 200)
    expected[0, 5:95, 5:95] = 1
    expected[1, 5:95, 105:195] = 1
    torch.testing.assert_close(masks[:2], expected)
    torch.testing.assert_close(masks[2], (expected.sum(0) == 0).float())
    assert torch.equal(speaker_masks(100, 200, 1), torch.ones(3, 100, 200))


@pytest.mark.parametrize(
    "bbox",
    [
        [[0, 0, 50, 50]],  # one box for two speakers
        [[0, 0, 50, 50], [0, 0, 50, 50], [0, 0, 5, 5]],
        [[0, 0, 50, 50], ["a", 0, 50, 50]],
        [[0, 0, 50, 50], [0, None, 50, 50]],
        [[0, 0, 50, 50], [0, True, 50, 50]],
        [[0, 0, 50, 50], [0, 0, float("nan"), 50]],
        [[0, 0, 50, 50], [0, 0, 50]],
        [[0, 0, 50, 50], "0,0,50,50"],
        [[50, 0, 10, 50], [0, 60, 50, 100]],  # inverted rows
        [[0, 50, 50, 10], [0, 60, 50, 100]],  # inverted columns
        [[0, 0, 50, 50], [0, 60, 50, 60]],  # zero width
        [[0, 0, 50, 50], [10.2, 60, 10.7, 100]],  # no whole pixel after int()
        [[-1, 0, 50, 50], [0, 60, 50, 100]],  # outside the image
        [[0, 0, 101, 50], [0, 60, 50, 100]],
        [[0, 0, 50, 50], [0, 60, 50, 201]],
        "not a list",
    ],
)
def test_bbox_errors(bbox):
    _raises("bbox", speaker_masks, 100, 200, 2, bbox)


def test_bbox_at_image_edges_is_fine():
    masks = speaker_masks(100, 200, 2, [[0, 0, 100, 100], [0, 100, 100, 200]])
    assert masks[2].sum() == 0


# ---------------------------------------------------------------------------------------
# mp4 writing / probing


def test_write_and_probe_mp4_roundtrip(tmp_path):
    frames = torch.linspace(-1, 1, 30).view(1, 30, 1, 1).expand(3, 30, 64, 96).contiguous()
    target = tmp_path / "out.mp4"
    data = write_mp4(frames, _tone(3.0), fps=25, path=target)
    assert target.read_bytes() == data
    assert data.find(b"moov") < data.find(b"mdat")  # +faststart
    info = probe_mp4(data)
    assert info["video_codec"] == "h264" and info["fps"] == 25
    assert info["num_frames"] == 30 and (info["width"], info["height"]) == (96, 64)
    assert info["audio_codec"] == "aac" and info["audio_sample_rate"] == RATE
    assert info["audio_duration"] == pytest.approx(1.2, abs=0.1)  # trimmed to 30 / 25 s
    assert probe_mp4(target)["num_frames"] == 30


def test_write_mp4_pads_short_audio_and_odd_sizes():
    frames = np.full((20, 33, 47, 3), 128, np.uint8)
    info = probe_mp4(write_mp4(frames, _tone(0.3)))
    assert info["num_frames"] == 20 and (info["width"], info["height"]) == (48, 34)
    assert info["audio_duration"] == pytest.approx(0.8, abs=0.1)


def test_write_mp4_reports_ffmpeg_errors():
    with pytest.raises(RuntimeError, match="ffmpeg"):
        write_mp4(torch.zeros(3, 2, 16, 16), None, preset="no-such-preset")


# ---------------------------------------------------------------------------------------
# Colour correction


def test_lab_conversion_reference_values():
    colours = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.2, 0.5, 0.7]], dtype=torch.float64)
    # skimage 0.26 color.rgb2lab on the same colours.
    skimage_lab = [
        [100.0, -2.45493786e-03, 4.65342115e-03],
        [0.0, 0.0, 0.0],
        [53.2405879, 80.0923082, 67.2027510],
        [50.9720364, -6.39817671, -33.7093230],
    ]
    np.testing.assert_allclose(rgb_to_lab(colours).numpy(), skimage_lab, atol=1e-6)
    rgb = torch.from_numpy(np.random.default_rng(2).random((50, 3)))
    np.testing.assert_allclose(lab_to_rgb(rgb_to_lab(rgb)).numpy(), rgb.numpy(), atol=1e-9)


def _official_match_and_blend(video: np.ndarray, reference: np.ndarray, strength: float) -> np.ndarray:
    """The official ``match_and_blend_colors`` in NumPy float32 (skimage's formulas, float64
    statistics), the oracle the torch version is held to: [3, T, H, W] in [-1, 1]."""
    xyz_from_rgb = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                             [0.019334, 0.119193, 0.950227]])
    white = np.array([0.95047, 1.0, 1.08883])

    def to_lab(rgb):
        lin = np.where(rgb > 0.04045, np.power((rgb + 0.055) / 1.055, 2.4, dtype=np.float32), rgb / 12.92)
        xyz = lin @ (xyz_from_rgb.T / white).astype(np.float32)
        f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
        return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)

    def to_rgb(lab):
        fy = (lab[..., 0] + 16.0) / 116.0
        f = np.stack([lab[..., 1] / 500.0 + fy, fy, np.maximum(fy - lab[..., 2] / 200.0, 0.0)], -1)
        xyz = np.where(f > 0.2068966, f * f * f, (f - 16.0 / 116.0) / 7.787)
        lin = xyz @ (np.linalg.inv(xyz_from_rgb) * white).T.astype(np.float32)
        gamma = 1.055 * np.power(np.maximum(lin, 0.0), 1.0 / 2.4, dtype=np.float32) - 0.055
        return np.clip(np.where(lin > 0.0031308, gamma, lin * 12.92), 0.0, 1.0).astype(np.float32)

    def stats(lab):
        flat = lab.reshape(-1, 3)
        return ([flat[:, c].mean(dtype=np.float64) for c in range(3)], [flat[:, c].std(dtype=np.float64) for c in range(3)])

    ref_mean, ref_std = stats(to_lab(np.clip((reference.transpose(1, 2, 0) + 1) / 2, 0, 1).astype(np.float32)))
    out = np.empty(video.shape[1:] + (3,), np.float32)
    for t in range(video.shape[1]):
        frame = np.clip((video[:, t].transpose(1, 2, 0) + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)
        lab = to_lab(frame)
        mean, std = stats(lab)
        for c in range(3):
            lab[..., c] = ref_mean[c] if std[c] < 1e-4 else (lab[..., c] - mean[c]) * (ref_std[c] / std[c]) + ref_mean[c]
        out[t] = (1.0 - strength) * frame + strength * to_rgb(lab)
    return (out * 2.0 - 1.0).transpose(3, 0, 1, 2)


def test_color_match():
    generator = torch.Generator().manual_seed(0)
    video = torch.rand(3, 10, 24, 32, generator=generator) * 0.5 - 0.8  # dark, low contrast
    video[:, 1] = 0.25  # a flat frame
    reference = torch.rand(3, 24, 32, generator=generator) * 2 - 1
    assert ColorTarget.of(reference, 0.0) is None and color_match(video, None) is video
    target = ColorTarget.of(reference, 1.0)
    matched = color_match(video, target)
    assert matched.shape == video.shape and matched.dtype == torch.float32
    # Against the official's float32 NumPy computation (the pipeline's parity bar is 1e-4).
    official = _official_match_and_blend(video.numpy(), reference.numpy(), 1.0)
    assert np.abs(matched.numpy() - official).max() < 5e-5
    reference_lab = rgb_to_lab(((reference.permute(1, 2, 0) + 1) / 2).double())
    frame_lab = rgb_to_lab(((matched[:, 0].permute(1, 2, 0) + 1) / 2).double())
    # Means land on the reference's (up to gamut clipping).
    np.testing.assert_allclose(frame_lab.reshape(-1, 3).mean(0), reference_lab.reshape(-1, 3).mean(0), atol=3.0)
    half = color_match(video, ColorTarget.of(reference, 0.5))
    torch.testing.assert_close(half, (video + matched) / 2, atol=1e-5, rtol=0)
    _raises("color_correction", ColorTarget.of, reference, 1.5)


def test_probe_reads_containers_and_streams_by_structure(tmp_path):
    """PyAV, not ffmpeg's banner text: codecs, sizes, rates, rotation and durations are
    fields; its wheel decodes what the project reads."""
    import subprocess

    import av

    from multitalk.utils.ffmpeg import ffmpeg_exe
    from multitalk.utils.probe import UnreadableMedia, probe

    for name in ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "aac", "mp3", "opus", "flac", "pcm_s16le"):
        assert av.codec.Codec(name, "r").is_decoder, name
    mp4 = tmp_path / "a.mp4"
    mp4.write_bytes(write_mp4(np.zeros((10, 32, 48, 3), np.uint8), _tone(0.4)))
    info = probe(str(mp4))
    video, audio = info.first("video"), info.first("audio")
    assert info.container.startswith("mov,mp4") and info.duration == pytest.approx(0.4, abs=0.05)
    assert (video.codec, video.width, video.height, video.fps, video.rotation) == ("h264", 48, 32, 25.0, 0)
    assert (audio.codec, audio.sample_rate) == ("aac", 16000)
    rotated = tmp_path / "rotated.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-display_rotation", "90", "-i", str(mp4), "-c", "copy",
                    str(rotated)], check=True)
    turned = probe(str(rotated)).first("video")
    assert (turned.rotation, turned.width, turned.height) == (90, 32, 48)  # as displayed
    png = tmp_path / "still.png"
    Image.new("RGB", (20, 10)).save(png)
    assert probe(str(png)).container == "png_pipe"
    text = tmp_path / "notes.txt"
    text.write_text("not media")
    with pytest.raises(UnreadableMedia):
        probe(str(text))
