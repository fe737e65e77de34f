"""InfiniteTalk dubbing of an edited video: shot cuts found (PySceneDetect, the official
--scene_seg detectors) and each chunk's reference frame taken from its own shot."""
from __future__ import annotations

import io
import subprocess

import pytest
import torch

from multitalk.api import GenerationRequest, InputError, Limits, SamplingOptions
from multitalk.utils.shots import ChunkReference, chunk_references, detect_cuts

CUT = 40  # the test source: 1.6 s of ref_video.mp4, then 1.6 s of multi1.png


def test_each_chunk_takes_its_reference_from_its_own_shot():
    starts = [0, 12, 24, 36, 48, 60]  # 17-frame chunks continuing from 5 frames: 75 frames of audio
    plain = chunk_references(starts, 17, 5, 75)
    assert plain == [ChunkReference(s, 0) for s in starts]  # no cuts: the frame at each chunk's start
    picks = chunk_references(starts, 17, 5, 75, [CUT])
    # Chunk 2 adds frames 29-40 (11 before the cut, 1 after): shot 0. Chunk 3 adds 41-52: shot 1,
    # from the first frame after the cut (its start, 36, lies in shot 0), and starts afresh.
    assert [p.shot for p in picks] == [0, 0, 0, 1, 1, 1]
    assert [p.frame for p in picks] == [0, 12, 24, CUT + 1, 48, 60]
    assert [p.new_shot for p in picks] == [False, False, False, True, False, False]
    # A first shot too short for any chunk: the first chunk already takes the second shot.
    assert chunk_references(starts, 17, 5, 75, [6])[0] == ChunkReference(7, 1)


def test_shot_cuts_need_a_source_video(fixtures_dir):
    from multitalk import driver, infinitetalk

    wav = (fixtures_dir / "single" / "1.wav").read_bytes()
    png = (fixtures_dir / "single" / "single1.png").read_bytes()
    for check, request in ((infinitetalk.check_condition, GenerationRequest(image=png, audio=[wav], scene_cuts=True)),
                           (lambda r: driver.precheck(r, Limits()), GenerationRequest(image=png, audio=[wav],
                                                                                       scene_cuts=True))):
        with pytest.raises(InputError) as e:
            check(request)
        assert e.value.field == "scene_cuts"


def _two_shots(fixtures_dir, tmp_path) -> bytes:
    """An edited source: 1.6 s of the sample video, a hard cut, 1.6 s of the two-person picture."""
    import imageio_ffmpeg

    out = tmp_path / "two_shots.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error",
                    "-t", "1.6", "-i", str(fixtures_dir / "video" / "ref_video.mp4"),
                    "-loop", "1", "-t", "1.6", "-i", str(fixtures_dir / "multi1" / "multi1.png"),
                    "-filter_complex", "[0:v]scale=96:96,setsar=1,fps=25[a];"
                    "[1:v]scale=-2:96,crop=96:96,setsar=1,fps=25,format=yuv420p[b];[a][b]concat=n=2:v=1[v]",
                    "-map", "[v]", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-r", "25", str(out)],
                   check=True, capture_output=True)
    return out.read_bytes()


@pytest.mark.slow
@pytest.mark.fixtures
def test_a_two_shot_source_is_split_at_the_cut_and_each_chunk_references_its_shot(tiny_official, fixtures_dir,
                                                                                     tmp_path):
    import soundfile as sf

    from multitalk.infinitetalk import infinitetalk_request, reference_at
    from multitalk.pipeline import MultiTalkPipeline
    from multitalk.utils.video_source import VideoSource

    source = _two_shots(fixtures_dir, tmp_path)
    path = tmp_path / "two_shots.mp4"
    assert detect_cuts(str(path)) == [CUT]
    speech, rate = sf.read(str(fixtures_dir / "single" / "1.wav"))
    wav = io.BytesIO()
    sf.write(wav, speech[: 3 * rate], rate, format="WAV")  # 75 frames: chunks start at 0, 12, ..., 60

    pipe = MultiTalkPipeline.from_pretrained(str(tiny_official), model="infinitetalk")
    image_stage = pipe.stages.image
    seen: list[tuple[torch.Tensor, int]] = []
    encode = image_stage.encode_reference

    def recording(reference, motion_pixels, frames):
        seen.append((reference.clone(), motion_pixels.shape[1]))
        return encode(reference, motion_pixels, frames)

    image_stage.encode_reference = recording
    request = infinitetalk_request([wav.getvalue()], video=source, size="infinitetalk-32", frames=17, motion_frames=5,
                                   sampling=SamplingOptions(steps=1), scene_cuts=True)
    result = pipe.generate(request)
    assert result.num_frames == 75 and result.chunks == 6

    picks = chunk_references([0, 12, 24, 36, 48, 60], 17, 5, 75, [CUT])
    with VideoSource(source) as video:
        hw = seen[0][0].shape[-2:]
        for (reference, motion), pick in zip(seen, picks):
            assert torch.equal(reference, reference_at(video, pick.frame, tuple(hw)))  # the frame picked...
            assert (pick.frame < CUT) == (pick.shot == 0)  # ... lies in the chunk's own shot
            assert motion == (1 if pick.new_shot or pick is picks[0] else 5)  # a new shot starts afresh
        # and the two shots are told apart by what they show: the man's video, then the car
        first, second = reference_at(video, 10, tuple(hw)), reference_at(video, 70, tuple(hw))
    for (reference, _), pick in zip(seen, picks):
        near_first = (reference - first).abs().mean() < (reference - second).abs().mean()
        assert near_first == (pick.shot == 0)
    assert [p.shot for p in picks] == [0, 0, 0, 1, 1, 1]
