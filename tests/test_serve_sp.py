"""Sequence-parallel Diffusion over Ray: rank actors in a placement group (gloo on CPU).

One Ray start for the module (4 logical CPUs: the placement-group bundles need them).

* ``test_rank_group_matches_serial``: two rank actors in a placement group (sequence
  parallel, or one guidance group each) sample the same latents as the serial
  ``DiffusionStage`` on the tiny weights (one and two speakers).
* ``test_guards``: bad degrees fail with a clear message (no Ray needed).
* ``test_served_sp2_job_and_rank_failure``: the served application with ``sp_degree=2``
  completes a job (valid mp4); then one rank actor is killed mid-job: the replica turns
  unhealthy, Serve replaces it, the ingress retries the chunk and the job still completes.

Ray workers import ``deployments.*`` by name: the fixture puts the repository root on
their PYTHONPATH.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from conftest import local_serve
import torch

pytestmark = [pytest.mark.serve, pytest.mark.slow, pytest.mark.timeout(600)]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory):
    with local_serve(tmp_path_factory.mktemp("serve-sp"), num_cpus=4, namespace="serve-sp") as env:
        yield env


# --------------------------------------------------------------------------- (a) parity
def _chunk_inputs(people: int, seed: int = 0):
    from multitalk.checkpoints.tiny import tiny_dit_config
    from multitalk.stages import ChunkJob, ImageConditioning, TextEmbeddings

    cfg = tiny_dit_config()
    g = torch.Generator().manual_seed(seed)
    h, w, frames = 8, 12, 17  # 5 latent frames: an uneven 3/2 split over 2 ranks
    n_t = 1 + (frames - 1) // 4
    masks = torch.zeros(3, h, w)
    masks[0, :, : w // 2 - 1] = 1
    masks[1, :, w // 2 + 1:] = 1
    masks[2] = 1 - masks[0] - masks[1]
    job = ChunkJob(frames=frames, latent_hw=(h, w), audio_start=0, ref_masks=masks, seed=7, steps=3)
    audio = torch.randn(people, frames + 4, cfg["audio_blocks"], cfg["audio_channels"], generator=g)
    image = ImageConditioning(torch.randn(1, 257, cfg["image_dim"], generator=g),
                              torch.randn(20, n_t, h, w, generator=g))
    text = TextEmbeddings(torch.randn(7, cfg["text_dim"], generator=g), torch.randn(5, cfg["text_dim"], generator=g))
    return job, audio, image, text


@pytest.mark.parametrize("degrees", [{"sp_degree": 2}, {"cfg_degree": 2}], ids=["sp2", "cfg2"])
def test_rank_group_matches_serial(ray_env, tiny_official, degrees):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from deployments.diffusion_parallel import ParallelSettings, RankGroup
    from multitalk.stages import DiffusionStage

    serial = DiffusionStage.from_pretrained(str(tiny_official))
    pg = placement_group([{"CPU": 0.5}, {"CPU": 0.5}], strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=120)
    settings = {"models_root": str(tiny_official), "device": "cpu", "dtype": "float32"}
    group = RankGroup(settings, ParallelSettings(**degrees, cpus_per_rank=0.5))

    async def run_all():
        await group.start(pg)
        assert [i["backend"] for i in group.info] == ["gloo", "gloo"]
        out = {}
        for people in (1, 2):
            events = [e async for e in group.sample(*_chunk_inputs(people))]
            steps = [e["step"] for e in events if e["event"] == "step"]
            assert steps == [1, 2, 3], events
            assert events[-1]["event"] == "result"
            out[people] = events[-1]["latents"]
        await group.check()
        return out

    try:
        parallel = asyncio.run(run_all())
        for people in (1, 2):
            reference = serial.sample(*_chunk_inputs(people))
            diff = (parallel[people] - reference).abs().max().item()
            print(f"{degrees} (rank actors) vs one process, {people} speaker(s): max abs diff {diff:.3e}")
            assert reference.abs().max().item() > 0.1
            assert diff <= TOLERANCE
        # a dead rank: check() fails and the group refuses further work with a retryable error
        from deployments.diffusion_parallel import DiffusionRanksFailed
        from deployments.retry import is_transient

        ray.kill(group.ranks[1], no_restart=True)
        with pytest.raises(DiffusionRanksFailed) as info:
            asyncio.run(group.check(timeout=30))
        assert is_transient(info.value) and group.broken
    finally:
        for r in group.ranks:
            ray.kill(r, no_restart=True)
        remove_placement_group(pg)


# --------------------------------------------------------------------------- guards
def test_guards():
    from deployments.diffusion_parallel import ParallelSettings, deployment_options, validate_parallel

    validate_parallel(ParallelSettings(sp_degree=8), 40)
    with pytest.raises(ValueError, match=r"sp_degree=3.*ulysses_degree 3 does not divide the model's 40 attention heads"):
        validate_parallel(ParallelSettings(sp_degree=3), 40)
    with pytest.raises(ValueError, match=r"ulysses_degree \* ring_degree = 2 \* 1 = 2 must equal .* 4"):
        validate_parallel(ParallelSettings(sp_degree=4, ulysses_degree=2), 40)
    with pytest.raises(ValueError, match="ring attention needs the sequence split evenly"):
        validate_parallel(ParallelSettings(sp_degree=4, ulysses_degree=2, ring_degree=2), 40)
    validate_parallel(ParallelSettings(cfg_degree=3), 40)
    validate_parallel(ParallelSettings(cfg_degree=2, sp_degree=4), 40)
    with pytest.raises(ValueError, match="at most 3 guidance passes"):
        validate_parallel(ParallelSettings(cfg_degree=4), 40)
    with pytest.raises(ValueError, match="cannot be combined with cfg_degree > 1"):
        validate_parallel(ParallelSettings(cfg_degree=2, sp_degree=2, ulysses_degree=1, ring_degree=2,
                                           latent_frames=20), 40)
    assert len(deployment_options({"device": "cuda", "parallel": {"cfg_degree": 2, "sp_degree": 2}})
               ["placement_group_bundles"]) == 4
    with pytest.raises(ValueError, match="unknown parallel settings"):
        ParallelSettings.from_settings({"parallel": {"sp": 2}})
    assert deployment_options({"parallel": {"sp_degree": 1}}) == {}
    opts = deployment_options({"device": "cuda", "parallel": {"sp_degree": 4}})
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    assert opts["placement_group_bundles"] == [{"CPU": 1.5, "GPU": 1.0}] + [{"CPU": 1.0, "GPU": 1.0}] * 3
    assert opts["ray_actor_options"]["num_gpus"] == 0
    cpu = deployment_options({"device": "cpu", "parallel": {"sp_degree": 2}})
    assert all("GPU" not in b for b in cpu["placement_group_bundles"])


# --------------------------------------------------------------------------- (b), (c) served
def _wait(url, job_id, timeout, states=("COMPLETED", "FAILED", "CANCELLED"), until=None):
    import requests

    deadline = time.monotonic() + timeout
    body = None
    while time.monotonic() < deadline:
        body = requests.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        if body["state"] in states or (until is not None and until(body)):
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {states}: {body}")


def test_served_sp2_job_and_rank_failure(ray_env, fixtures_dir, embedded_cache):
    import ray
    import requests
    from ray import serve

    from pipeline_graph import build_app

    url, tmp = ray_env
    store_dir = tmp / "store"
    store_dir.mkdir()
    (store_dir / "1.wav").write_bytes((fixtures_dir / "single" / "1.wav").read_bytes())
    (store_dir / "single1.png").write_bytes((fixtures_dir / "single" / "single1.png").read_bytes())
    app = build_app({"device": "cpu", "dtype": "float32", "cache_dir": embedded_cache,
                     "store": {"local_root": str(store_dir)}, "ingress": {"persist_interval_s": 0.2},
                     "parallel": {"sp_degree": 2, "cpus_per_rank": 0.5, "replica_cpus": 0.25,
                                  "health_check_period_s": 1}})
    serve.run(app, name="multitalk-sp", route_prefix="/")
    diffusion = serve.get_deployment_handle("Diffusion", "multitalk-sp")
    try:
        before = diffusion.ranks.remote().result(timeout_s=60)
        assert len(before["ranks"]) == 2 and before["broken"] is None

        # (b) a full job through the served application
        body = {"image": "single1.png", "audio": ["1.wav"], "prompt": "a person talking", "frames": 5,
                "size": "multitalk-128", "sampling": {"steps": 2}}
        r = requests.post(f"{url}/v1/jobs", json=body, timeout=60)
        assert r.status_code == 202, r.text
        status = _wait(url, r.json()["id"], timeout=300)
        assert status["state"] == "COMPLETED", status
        video = requests.get(f"{url}/v1/jobs/{status['id']}/video", timeout=60).content
        assert video[4:8] == b"ftyp"
        assert status["result"]["lip_sync"] is True and status["progress"]["total_steps"] == 2

        # (c) kill one rank mid-job: the replica is replaced and the job still completes
        r = requests.post(f"{url}/v1/jobs", json={**body, "sampling": {"steps": 40}}, timeout=60)
        job_id = r.json()["id"]
        _wait(url, job_id, timeout=300, until=lambda b: b["progress"]["stage"] == "diffusion"
              and (b["progress"]["step"] or 0) >= 2)
        ray.kill(before["ranks"][1], no_restart=True)
        status = _wait(url, job_id, timeout=300)
        assert status["state"] == "COMPLETED", status
        assert requests.get(f"{url}/v1/jobs/{job_id}/video", timeout=60).content[4:8] == b"ftyp"
        after = diffusion.ranks.remote().result(timeout_s=60)
        assert after["replica"] != before["replica"], "the replica with the dead rank was not replaced"
        assert after["broken"] is None and len(after["ranks"]) == 2
    finally:
        serve.delete("multitalk-sp")
