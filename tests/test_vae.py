"""Tests for multitalk.modules.vae (tiny random Wan VAE, CPU, fp32)."""

import warnings

import pytest
import torch

from multitalk.modules.loading import CheckpointError

from multitalk.modules.vae import (
    TINY_CONFIG,
    WanVAE,
    _build_empty,
    original_to_diffusers_key_map,
    original_vae_key_names,
    save_tiny_diffusers,
    save_tiny_original,
)

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*accelerate.*")


def _video(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vae")
    pth = str(root / "Wan2.1_VAE.pth")
    vae_dir = str(root / "vae")
    save_tiny_original(pth, seed=0)
    save_tiny_diffusers(vae_dir, seed=0)
    return pth, vae_dir


@pytest.fixture(scope="module")
def vae(tiny_paths):
    return WanVAE.from_original(tiny_paths[0])


def test_key_map_is_bijection_onto_diffusers_model():
    key_map = original_to_diffusers_key_map()
    assert list(key_map) == original_vae_key_names()
    assert len(set(key_map.values())) == len(key_map)
    assert set(key_map.values()) == set(_build_empty(TINY_CONFIG).state_dict())


def test_from_original_infers_dims(vae):
    assert vae.model.config.base_dim == 8
    assert vae.z_dim == 16
    assert vae.latents_mean.shape == (16,) and vae.latents_std.shape == (16,)
    assert vae.latents_mean[0].item() == pytest.approx(-0.7571)
    assert vae.latents_std[-1].item() == pytest.approx(1.9160)


def test_original_and_diffusers_layouts_identical(tiny_paths, vae):
    other = WanVAE.from_pretrained(tiny_paths[1])
    for key, value in vae.model.state_dict().items():
        assert torch.equal(value, other.model.state_dict()[key]), key
    video = _video((1, 3, 5, 16, 16))
    z = vae.encode(video)
    assert torch.equal(z, other.encode(video))
    assert torch.equal(vae.decode(z), other.decode(z))


@pytest.mark.parametrize("frames", [1, 5, 17])
def test_shapes(vae, frames):
    video = _video((1, 3, frames, 16, 24), seed=frames)
    z = vae.encode(video)
    assert z.shape == (1, 16, 1 + (frames - 1) // 4, 2, 3)
    assert z.dtype == torch.float32
    assert WanVAE.latent_shape(frames, 16, 24) == tuple(z.shape[2:])
    out = vae.decode(z)
    assert out.shape == (1, 3, frames, 16, 24)


def test_decode_clamps(vae):
    z = 50 * torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    out = vae.decode(z)
    assert out.min() >= -1 and out.max() <= 1
    assert (out.abs() == 1).any()  # large latents really saturate, so the clamp was exercised


def test_deterministic(vae):
    video = _video((1, 3, 5, 16, 16), seed=4)
    assert torch.equal(vae.encode(video), vae.encode(video))
    z = vae.encode(video)
    assert torch.equal(vae.decode(z), vae.decode(z))


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    save_tiny_original(str(tmp_path / "a.pth"), seed=0)
    save_tiny_original(str(tmp_path / "b.pth"), seed=0)
    save_tiny_original(str(tmp_path / "c.pth"), seed=1)
    a, b, c = (torch.load(str(tmp_path / f"{n}.pth"), weights_only=True) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.conv1.weight"], c["encoder.conv1.weight"])


def test_tiled_decode_runs(vae):
    z = vae.encode(_video((1, 3, 5, 32, 32), seed=5))
    out = vae.decode(z, tiled=True, tile_size=16, tile_stride=8)
    assert out.shape == (1, 3, 5, 32, 32)
    assert out.min() >= -1 and out.max() <= 1
    assert not vae.model.use_tiling  # tiling is per call, not sticky


def test_bf16_weights(tiny_paths):
    vae16 = WanVAE.from_original(tiny_paths[0], dtype=torch.bfloat16)
    assert next(vae16.model.parameters()).dtype == torch.bfloat16
    z = vae16.encode(_video((1, 3, 1, 16, 16)))
    assert z.dtype == torch.float32 and torch.isfinite(z).all()


# ---- strict loading ------------------------------------------------------------------------------

def _load_state(tiny_paths):
    return torch.load(tiny_paths[0], weights_only=True)


def test_strict_shape_mismatch_names_key_and_shapes(tiny_paths, tmp_path):
    state = _load_state(tiny_paths)
    key = "decoder.upsamples.4.shortcut.weight"
    original_shape = tuple(state[key].shape)
    state[key] = torch.zeros(original_shape[0] + 1, *original_shape[1:])
    path = str(tmp_path / "bad_shape.pth")
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        WanVAE.from_original(path)
    message = str(err.value)
    assert key in message
    assert str((original_shape[0] + 1, *original_shape[1:])) in message
    assert str(original_shape) in message


def test_strict_missing_key(tiny_paths, tmp_path):
    state = _load_state(tiny_paths)
    del state["encoder.middle.1.proj.bias"]
    path = str(tmp_path / "missing.pth")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"encoder\.middle\.1\.proj\.bias"):
        WanVAE.from_original(path)


def test_strict_unexpected_key(tiny_paths, tmp_path):
    state = _load_state(tiny_paths)
    state["encoder.extra.weight"] = torch.zeros(3)
    path = str(tmp_path / "unexpected.pth")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"encoder\.extra\.weight"):
        WanVAE.from_original(path)


def test_not_a_vae_checkpoint(tmp_path):
    path = str(tmp_path / "other.pth")
    torch.save({"foo": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"encoder\.conv1\.weight"):
        WanVAE.from_original(path)


def test_concurrent_calls_on_one_vae_match_serial_ones(vae):
    """Stage replicas serve several requests at once from worker threads; the Wan VAE keeps
    its causal-conv cache on the module, so unguarded concurrent calls mixed frames and even
    returned wrong frame counts."""
    import threading

    latents = [torch.randn(1, 16, 2 + i, 6, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    videos = [_video((1, 3, 5 + 4 * i, 48, 64), seed=i) for i in range(4)]
    serial_dec = [vae.decode(z) for z in latents]
    serial_enc = [vae.encode(v) for v in videos]
    got: dict = {}

    def work(i):
        got["dec", i] = vae.decode(latents[i])
        got["enc", i] = vae.encode(videos[i])

    for _ in range(2):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(4):
            assert torch.equal(got["dec", i], serial_dec[i])
            assert torch.equal(got["enc", i], serial_enc[i])
