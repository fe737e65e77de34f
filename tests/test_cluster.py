"""The production serve_config.yaml on Ray's multi-node harness, with the real autoscaler.

One cluster for the module (``tests/cluster_harness.py``): a CPU-only head and the GPU
worker types of cluster.yaml (scaled down) that the ``fake_multinode`` autoscaler adds and
removes; deployed: serve_config.yaml + the CPU overlay, with the config's sequence-parallel
Diffusion (two ranks, up to two replicas). Node death is detected after
~4 s here (the suite); ``bench/cluster.py`` runs the same drills with Ray's default health
checks and reports the figures (docs/BENCHMARKS.md).

* placement: GPU stages only on GPU nodes, the encoders' fractions of one GPU, the SP ranks
  in one STRICT_PACK placement group on one node, the two ingress replicas on two nodes;
* a burst scales Diffusion up (the autoscaler adds a GPU node for a second SP replica); that
  node is SIGKILLed mid-burst; every job completes, once; then replicas and nodes shrink
  back. (An ingress replica's node killed, its jobs taken over by the other replica, is a
  drill of bench/cluster.py: it restarts every model replica, minutes on this machine; the
  takeover rules are tested in tests/test_takeover.py and, served, tests/test_serve_ha.py.)
* live settings: a ``serve deploy`` changing only the user_config (a preset, request
  defaults, a limit, a LoRA) reaches every replica without a restart, a running job finishes.
"""
from __future__ import annotations

import shutil
import time
from types import SimpleNamespace

import pytest

from cluster_harness import (APP, FAST_HEALTH_CHECKS, Jobs, LocalCluster, completions, free_port,
                             replica_log, sequence_parallel_variant, serve_config)

pytestmark = [pytest.mark.cluster, pytest.mark.serve, pytest.mark.slow, pytest.mark.fixtures,
              pytest.mark.timeout(1200)]

BODY = {"image": "multi1.png", "audio": ["1.wav"], "prompt": "two people talking", "frames": 17,
        "size": "multitalk-128"}
GPU_STAGES = ("AudioEncoder", "ImageEncoder", "TextEncoder", "VaeDecoder", "Speech")


@pytest.fixture(scope="module")
def app(tmp_path_factory, fixtures_dir, embedded_cache):
    work = tmp_path_factory.mktemp("cluster")
    store = work / "store"
    store.mkdir()
    for name in ("1.wav", "multi1.png"):
        shutil.copy(fixtures_dir / "multi1" / name, store / name)
    port = free_port()
    config = serve_config(port, embedded_cache, {"local_root": str(store)},
                          sequence_parallel_variant(sp_degree=2, max_replicas=2))
    with LocalCluster(work, autoscaling=True, health_checks=FAST_HEALTH_CHECKS) as cluster:
        cluster.deploy(config)
        cluster.wait_running(600)
        yield SimpleNamespace(cluster=cluster, config=config, url=f"http://127.0.0.1:{port}",
                              jobs=Jobs(f"http://127.0.0.1:{port}", store), store=store)


def _handle(name):
    from ray import serve

    return serve.get_deployment_handle(name, APP)


def _deployment(config, name):
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


def test_placement(app):
    import ray
    from ray.util import placement_group_table

    nodes = {n["node_id"]: n for n in app.cluster.nodes()}
    gpu_nodes = {i for i, n in nodes.items() if n["resources"].get("GPU", 0) > 0}
    head = next(i for i, n in nodes.items() if n["head"])
    assert head not in gpu_nodes and gpu_nodes

    where = {name: _handle(name).loaded_with.remote().result() for name in GPU_STAGES}
    for name, info in where.items():
        wanted = _deployment(app.config, name)["ray_actor_options"]["num_gpus"]
        assert info["node_id"] in gpu_nodes, name
        assert info["resources"].get("GPU") == pytest.approx(wanted) and len(info["gpu_ids"]) == 1, (name, info)
    # Packed: the five fractions (0.2 + 0.25 x 3 + 0.05 = 1) share one GPU of one node.
    assert len({(i["node_id"], i["gpu_ids"][0]) for i in where.values()}) == 1, where

    ranks = _handle("Diffusion").ranks.remote().result()["ranks"]
    placed = ray.get([r.where.remote() for r in ranks])
    assert len(placed) == 2 and len({p["node_id"] for p in placed}) == 1 and placed[0]["node_id"] in gpu_nodes
    groups = [g for g in placement_group_table().values() if g["state"] == "CREATED"]
    assert len(groups) == 1 and groups[0]["strategy"] == "STRICT_PACK"
    assert set(groups[0]["bundles_to_node_id"].values()) == {placed[0]["node_id"]}
    assert all(b.get("GPU") == 1 for b in groups[0]["bundles"].values())

    ingress = app.cluster.running("MultiTalkIngress")
    assert len(ingress) == 2 and len({r["node_id"] for r in ingress}) == 2  # max_replicas_per_node: 1


def test_burst_scales_up_survives_a_gpu_node_dying_and_scales_down(app):
    cluster, jobs = app.cluster, app.jobs
    workers = lambda: [n for n in cluster.nodes() if not n["head"]]  # noqa: E731
    # Settled: nothing the deploy scaled (a second decoder and its node) is left.
    cluster.wait_running(180, until=lambda: len(workers()) == 1 and len(cluster.running("Diffusion")) == 1)
    first = workers()[0]["node_id"]
    t0 = time.monotonic()

    ids = [jobs.submit({**BODY, "sampling": {"steps": 40, "seed": i}}) for i in range(6)]
    # Up: Serve wants a second SP replica (two GPUs on one node); the autoscaler adds a node for it.
    cluster.wait_running(300, until=lambda: len(cluster.running("Diffusion")) == 2)
    scaled_up_s = time.monotonic() - t0
    replica_nodes = {r["node_id"] for r in cluster.running("Diffusion")}
    assert first in replica_nodes and len(replica_nodes) == 2
    added = (replica_nodes - {first}).pop()  # a node the autoscaler added for it
    second = next(r["replica_id"] for r in cluster.running("Diffusion") if r["node_id"] == added)

    # SIGKILL that node while its replica samples a job (its raylet, workers, agents): the SP
    # replica's two ranks and its placement group go with it; the chunk is re-sent to the other.
    # The burst may be nearly done by the time the new replica is up (how long the node and its
    # ranks take to start depends on the machine's load): while it has not sampled, the burst
    # is topped up (at most 6 more jobs), so that the router has work to give it.
    def second_samples() -> bool:
        if "Diffusion.sample started" in replica_log(cluster, "Diffusion", second):
            return True
        unfinished = [j for j in ids if (jobs.record(j) or {}).get("state") not in ("COMPLETED", "FAILED", "CANCELLED")]
        if len(unfinished) < 2 and len(ids) < 12:
            ids.append(jobs.submit({**BODY, "sampling": {"steps": 40, "seed": len(ids)}}))
        return False

    cluster.wait_running(120, until=second_samples)
    cluster.kill_node(added)

    records = jobs.wait(ids, 600)
    lost = [j for j, r in records.items() if r["state"] != "COMPLETED"]
    assert not lost, {j[:8]: (records[j]["state"], records[j].get("error")) for j in lost}
    for rec in records.values():
        assert (app.store / rec["result"]["key"]).read_bytes()[4:8] == b"ftyp"
    counts = completions(cluster)
    assert all(counts.get(j) == 1 for j in ids), counts  # none run twice to completion
    assert all(r["lease"] == 0 for r in records.values())  # no ingress died: nothing taken over

    # Down: Diffusion back to min_replicas, the autoscaler removes the idle nodes (a dead node
    # is out of the cluster once declared dead).
    cluster.wait_running(300, until=lambda: len(cluster.running("Diffusion")) == 1 and len(workers()) == 1)
    retries = sum(int(r["timings"].get("stage_retries", 0)) for r in records.values())
    assert retries >= 1  # the chunk that was sampling on the dead node was sent again
    print(f"scaled up after {scaled_up_s:.0f} s, down {time.monotonic() - t0:.0f} s after the burst began; "
          f"{retries} stage retries")


def test_live_settings_change_without_a_restart(app):
    import requests

    before = {(r["deployment"], r["replica_id"], r["pid"]) for r in app.cluster.replicas() if r["state"] == "RUNNING"}
    running = app.jobs.submit({**BODY, "sampling": {"steps": 12}})
    app.jobs.wait([running], 120, until=lambda rs: (rs[running] or {}).get("state") == "IN_PROGRESS")

    live = {"presets": {"tiny": {"loras": [{"name": "distill", "scale": 1.0}], "sampling": {"steps": 2}}},
            "request_defaults": {"size": "multitalk-128", "sampling": {"steps": 3}},
            "limits": {"max_steps": 50}, "loras": {"distill": "loras/distill.safetensors"}}
    # The same config with other user_configs (replaced whole, as an operator edits the file).
    _deployment(app.config, "MultiTalkIngress")["user_config"] = live
    _deployment(app.config, "Diffusion")["user_config"] = {"loras": live["loras"]}
    app.cluster.deploy(app.config)

    def applied():  # every replica's reconfigure ran with the new values
        ingress = app.cluster.running("MultiTalkIngress")
        diffusion = app.cluster.running("Diffusion")
        return (all("live settings applied: presets ['tiny']" in replica_log(app.cluster, "MultiTalkIngress", r["replica_id"])
                    for r in ingress)
                and all("Diffusion LoRAs: added ['distill']" in replica_log(app.cluster, "Diffusion", r["replica_id"])
                        for r in diffusion))

    app.cluster.wait_running(120, until=applied)
    assert requests.get(f"{app.url}/v1/models", timeout=30).json()["presets"] == ["tiny"]
    after = {(r["deployment"], r["replica_id"], r["pid"]) for r in app.cluster.replicas() if r["state"] == "RUNNING"}
    assert after == before  # the same replicas, the same processes

    tiny = app.jobs.submit({k: v for k, v in BODY.items() if k != "size"} | {"preset": "tiny"})
    too_many = requests.post(f"{app.url}/v1/jobs", json={**BODY, "sampling": {"steps": 51}}, timeout=60)
    assert too_many.status_code == 422 and too_many.json()["error"]["field"] == "sampling.steps", too_many.text
    records = app.jobs.wait([running, tiny], 180)
    assert records[running]["state"] == "COMPLETED" and records[running]["attempts"] == 1
    done = records[tiny]
    assert done["state"] == "COMPLETED", done
    assert done["result"]["loras"] == [{"name": "distill", "scale": 1.0}]
    assert done["options_applied"]["sampling.steps"]["value"] == 2
