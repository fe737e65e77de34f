"""InfiniteTalk chunks under the Diffusion stage's levers: batched guidance in-process, and
sequence / guidance parallelism over gloo, with the adapter swapped after the ranks are set
up; each must equal serial sampling of the same chunk (clean motion latents, both adapters)."""
from __future__ import annotations

import functools

import pytest
import torch

from multitalk.checkpoints.tiny import tiny_dit_config, tiny_dit_inputs
from multitalk.distributed.launch import spawn_ranks

TOLERANCE = 1e-4


def _chunk(adapter: str, teacache: float = 0.0, apg: bool = False):
    from multitalk.stages import ChunkJob, ImageConditioning, TextEmbeddings
    from multitalk.utils.sampler import GuidanceConfig

    people = 2 if adapter == "multi" else 1
    inp = tiny_dit_inputs(2, t_lat=4)
    cfg = tiny_dit_config()
    g = torch.Generator().manual_seed(5)
    job = ChunkJob(frames=13, latent_hw=(8, 12), audio_start=0, ref_masks=inp["ref_target_masks"], seed=3, steps=8,
                   teacache_thresh=teacache, guidance=GuidanceConfig(use_apg=apg), clean_motion=True,
                   adapter=adapter)
    audio = torch.randn(people, 40, cfg["audio_blocks"], cfg["audio_channels"], generator=g)
    image = ImageConditioning(inp["clip_fea"], inp["y"][:, :4], torch.randn(16, 2, 8, 12, generator=g))
    text = TextEmbeddings(inp["context"], torch.randn(3, cfg["text_dim"], generator=g))
    return job, audio, image, text


def test_batched_guidance_matches_serial(tiny_official):
    from multitalk.stages import DiffusionStage

    serial = DiffusionStage.from_pretrained(str(tiny_official), model="infinitetalk")
    batched = DiffusionStage.from_pretrained(str(tiny_official), model="infinitetalk", batch_guidance=True)
    for adapter in ("multi", "single"):
        a, b = serial.sample(*_chunk(adapter)), batched.sample(*_chunk(adapter))
        assert (a - b).abs().max().item() <= TOLERANCE and a.abs().max() > 0.1
        motion = _chunk(adapter)[2].motion_latents
        assert torch.equal(a[:, :2], motion)  # the motion latents come back clean


def _worker(rank: int, world_size: int, root: str, cfg_degree: int, result_path: str) -> None:
    from multitalk.distributed import GuidanceParallel, SequenceParallel, sp_forward
    from multitalk.stages import DiffusionStage

    sp_degree = world_size // cfg_degree
    serial_stage = DiffusionStage.from_pretrained(root, model="infinitetalk")
    stage = DiffusionStage.from_pretrained(root, model="infinitetalk")
    gp = GuidanceParallel(cfg_degree, sp_degree)
    if sp_degree > 1:
        SequenceParallel(gp.sp_group, ulysses_degree=sp_degree).parallelize(stage.model)
        stage.forward_fn = functools.partial(sp_forward, stage.model)
    stage.guidance_parallel = gp
    results = {}
    # The first chunk swaps the adapter on ranks set up with the other one in place.
    for adapter, teacache, apg in (("multi", 0.0, False), ("single", 1e6, False), ("multi", 0.0, True)):
        serial = serial_stage.sample(*_chunk(adapter, teacache, apg))
        parallel = stage.sample(*_chunk(adapter, teacache, apg))
        results[(adapter, teacache, apg)] = ((parallel - serial).abs().max().item(), serial.abs().max().item())
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, result_path)


@pytest.mark.slow
@pytest.mark.parametrize("world_size,cfg_degree", [(2, 2), (2, 1)], ids=["cfg2", "ulysses2"])
def test_parallel_ranks_match_serial_sampling(tiny_official, tmp_path, world_size, cfg_degree):
    path = tmp_path / "it.pt"
    spawn_ranks(_worker, world_size, str(tiny_official), cfg_degree, str(path))
    for rank, res in enumerate(torch.load(path)):
        for key, (diff, signal) in res.items():
            assert signal > 0.1 and diff <= TOLERANCE, (rank, key, diff)
