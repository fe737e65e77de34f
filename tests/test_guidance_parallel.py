"""Guidance parallelism over gloo: the guidance passes of each step on different ranks.

Each rank samples a whole chunk with ``DiffusionStage`` (the service's sampler) while owning
only some of every step's passes; the result must equal a serial sampling of the same chunk,
with and without sequence parallelism inside each group, and with TeaCache.
"""
from __future__ import annotations

import functools

import pytest
import torch

from multitalk.checkpoints.tiny import tiny_dit_config, tiny_dit_inputs
from multitalk.distributed.launch import spawn_ranks

pytestmark = pytest.mark.subprocess  # starts other processes

TOLERANCE = 1e-4


def _job_inputs(teacache: float = 0.0):
    from multitalk.stages import ChunkJob, ImageConditioning, TextEmbeddings

    inp = tiny_dit_inputs(2, t_lat=4)
    cfg = tiny_dit_config()
    g = torch.Generator().manual_seed(5)
    job = ChunkJob(frames=13, latent_hw=(8, 12), audio_start=0, ref_masks=inp["ref_target_masks"], seed=3,
                   steps=12, teacache_thresh=teacache)
    audio = torch.randn(2, 40, cfg["audio_blocks"], cfg["audio_channels"], generator=g)
    image = ImageConditioning(inp["clip_fea"], inp["y"][:, :4])
    text = TextEmbeddings(inp["context"], torch.randn(3, cfg["text_dim"], generator=g))
    return job, audio, image, text


def _worker(rank: int, world_size: int, root: str, cfg_degree: int, result_path: str) -> None:
    from multitalk.distributed import GuidanceParallel, SequenceParallel, sp_forward
    from multitalk.stages import DiffusionStage

    sp_degree = world_size // cfg_degree
    serial_stage = DiffusionStage.from_pretrained(root)
    stage = DiffusionStage.from_pretrained(root)
    gp = GuidanceParallel(cfg_degree, sp_degree)
    if sp_degree > 1:
        SequenceParallel(gp.sp_group, ulysses_degree=sp_degree).parallelize(stage.model)
        stage.forward_fn = functools.partial(sp_forward, stage.model)
    stage.guidance_parallel = gp
    results = {"local_passes": gp.local_passes(("cond", "drop_text", "uncond"))}
    for teacache in (0.0, 1e6):
        inputs = _job_inputs(teacache)
        serial = serial_stage.sample(*inputs)
        parallel = stage.sample(*inputs)
        results[teacache] = (parallel - serial).abs().max().item()
        results[f"signal {teacache}"] = serial.abs().max().item()
        results[f"serial {teacache}"] = serial
    # TeaCache (threshold 1e6: every step after its warm-up skips the blocks) changes the result,
    # identically on every rank.
    results["teacache moved"] = (results.pop("serial 0.0") - results.pop("serial 1000000.0")).abs().max().item()
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, result_path)


@pytest.mark.parametrize("world_size,cfg_degree", [
    pytest.param(3, 3, id="cfg3"),
    pytest.param(4, 2, id="cfg2xulysses2", marks=pytest.mark.slow),  # four ranks: ~18 s
])
def test_guidance_passes_over_ranks_match_serial_sampling(tiny_official, tmp_path, world_size, cfg_degree):
    path = tmp_path / "gp.pt"
    spawn_ranks(_worker, world_size, str(tiny_official), cfg_degree, str(path))
    per_rank = torch.load(path)
    for rank, res in enumerate(per_rank):
        for teacache in (0.0, 1e6):
            assert res[f"signal {teacache}"] > 0.1
            assert res[teacache] <= TOLERANCE, (rank, teacache, res)
    assert per_rank[0]["teacache moved"] > 1e-3  # TeaCache did skip steps
    # every pass is computed by exactly one SP group, and each group computes some
    owners = {r // (world_size // cfg_degree): tuple(res["local_passes"]) for r, res in enumerate(per_rank)}
    passes = [p for group in owners.values() for p in group]
    assert sorted(passes) == sorted(("cond", "drop_text", "uncond")) and all(owners.values())


def test_degrees_must_multiply_to_the_world_size(tmp_path):
    spawn_ranks(_bad_degrees_worker, 2, str(tmp_path / "bad.pt"))
    assert "must equal the world size 2" in torch.load(tmp_path / "bad.pt")


def _bad_degrees_worker(rank: int, world_size: int, result_path: str) -> None:
    from multitalk.distributed import GuidanceParallel

    try:
        GuidanceParallel(3, 1)
        message = ""
    except ValueError as e:
        message = str(e)
    if rank == 0:
        torch.save(message, result_path)
