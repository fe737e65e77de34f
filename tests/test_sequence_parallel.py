"""Sequence parallelism on CPU over gloo: 2 ranks must reproduce the serial DiT.

One spawn of 2 ranks runs every case (spawning costs more than the tiny forwards):
backends {yunchang, torch} x people {1, 2, 3} x latent frames {5 (uneven split 3/2), 4 (2/2)},
plus the head-count guard on a 3-head model. Rank 0 saves the measurements; the tests
below read them.
"""
from __future__ import annotations

import pytest
import torch

from multitalk.checkpoints.tiny import tiny_dit, tiny_dit_config, tiny_dit_inputs
from multitalk.distributed import FrameSplit, SequenceParallel, sp_forward, validate_sp_degrees
from multitalk.distributed.launch import spawn_ranks
from multitalk.modules.transformer_multitalk import MultiTalkTransformer3DModel

pytestmark = pytest.mark.subprocess  # starts other processes

TOLERANCE = 1e-4
BACKENDS = ("yunchang", "torch")


def _inputs(people: int, t_lat: int = 5, seed: int = 0):
    return tiny_dit_inputs(people, t_lat=t_lat, seed=seed)


def _worker(rank: int, world_size: int, result_path: str) -> None:
    import torch.distributed as dist

    results = {"diff": {}, "serial_max": {}}
    model = tiny_dit(0)
    for backend in BACKENDS:
        sp = SequenceParallel(None, ulysses_degree=world_size, backend=backend)
        for people in (1, 2, 3):
            for t_lat in (5, 4):
                inp = _inputs(people, t_lat)
                with torch.no_grad():
                    serial = model(**inp)
                    sp.parallelize(model)
                    parallel = sp_forward(model, **inp)
                    sp.unparallelize(model)
                    again = model(**inp)
                assert torch.equal(serial, again), "unparallelize must restore the serial model"
                # every rank must hold the same full output
                gathered = [torch.empty_like(parallel) for _ in range(world_size)]
                dist.all_gather(gathered, parallel)
                key = (backend, people, t_lat)
                results["diff"][key] = (parallel - serial).abs().max().item()
                results["rank_spread"] = max(
                    results.get("rank_spread", 0.0), max((g - parallel).abs().max().item() for g in gathered)
                )
                results["serial_max"][key] = serial.abs().max().item()

    # The compile lever on SP ranks (as deployments/diffusion_parallel.py sets it: regional,
    # fullgraph off since each attention's all-to-all is a graph break): same numbers.
    inp = _inputs(2, 5)
    with torch.no_grad():
        serial = model(**inp)
        model.compile_repeated_blocks(backend="eager", fullgraph=False)
        sp = SequenceParallel(None, ulysses_degree=world_size)
        sp.parallelize(model)
        results["compiled_diff"] = (sp_forward(model, **inp) - serial).abs().max().item()
        sp.unparallelize(model)

    # guard: 2-way Ulysses cannot split 3 heads
    three_heads = MultiTalkTransformer3DModel(**{**tiny_dit_config(), "dim": 48, "num_heads": 3})
    try:
        SequenceParallel(None, ulysses_degree=world_size).parallelize(three_heads)
        results["guard"] = None
    except ValueError as e:
        results["guard"] = str(e)
    if rank == 0:
        torch.save(results, result_path)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "results.pt"
    spawn_ranks(_worker, 2, str(path))
    return torch.load(path)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("people", [1, 2, 3])
@pytest.mark.parametrize("t_lat", [5, 4], ids=["uneven-frames", "even-frames"])
def test_two_ranks_match_the_serial_model(two_rank_results, backend, people, t_lat):
    key = (backend, people, t_lat)
    diff = two_rank_results["diff"][key]
    print(f"sp=2 vs sp=1 {key}: max abs diff {diff:.3e}")
    assert two_rank_results["serial_max"][key] > 0.1  # a real signal, not zeros
    assert diff <= TOLERANCE


def test_compiled_blocks_on_two_ranks_match_the_serial_model(two_rank_results):
    assert two_rank_results["compiled_diff"] <= TOLERANCE


def test_every_rank_returns_the_same_full_output(two_rank_results):
    assert two_rank_results["rank_spread"] == 0.0


def test_ulysses_degree_must_divide_the_heads(two_rank_results):
    message = two_rank_results["guard"]
    assert message is not None, "parallelize accepted 2-way Ulysses on 3 heads"
    assert "does not divide" in message and "3 attention heads" in message


def test_guard_message_for_the_40_head_model():
    validate_sp_degrees(40, 8, 1, 8)
    with pytest.raises(ValueError, match=r"ulysses_degree 3 does not divide the model's 40 attention heads.*\[1, 2, 4, 5, 8"):
        validate_sp_degrees(40, 3)
    with pytest.raises(ValueError, match="must equal the process group size 4"):
        validate_sp_degrees(40, 2, 1, 4)


def test_frame_split():
    split = FrameSplit.even_as_possible(21, 8, 10)
    assert split.frames == (3, 3, 3, 3, 3, 2, 2, 2)
    assert split.token_range(0) == (0, 30) and split.token_range(7) == (190, 210)
    with pytest.raises(ValueError, match="at least 4 latent frames"):
        FrameSplit.even_as_possible(3, 4, 10)


def _reference_efficient_attention(q, k, v, attn_bias=None, compute_log_sumexp=True, dropout_p=0.0,
                                   is_causal=False, scale=None):
    """CPU stand-in for ``aten._scaled_dot_product_efficient_attention`` (CUDA only): the
    output and the log-sum-exp the ring merges its blocks with. q/k/v ``[B, H, S, D]``."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    lse = torch.logsumexp(scores, dim=-1)
    out = (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)
    return out, lse


def _ring_worker(rank: int, world_size: int, result_path: str) -> None:
    import yunchang.kernels.attention as yunchang_attention
    from yunchang.kernels import AttnType

    import multitalk.distributed.sequence_parallel as sp_module

    yunchang_attention._scaled_dot_product_efficient_attention = _reference_efficient_attention
    sp_module.RING_ATTN_TYPE = AttnType.TORCH_EFFICIENT
    model = tiny_dit(0)
    results = {}
    for people in (1, 2):
        inp = _inputs(people, t_lat=4)  # 4 latent frames: an even split over 2 or 4 ranks
        with torch.no_grad():
            serial = model(**inp)
            sp = SequenceParallel(None, ulysses_degree=world_size // 2, ring_degree=2)
            sp.parallelize(model)
            results[people] = (sp_forward(model, **inp) - serial).abs().max().item()
            sp.unparallelize(model)
    uneven = _inputs(1, t_lat=5)
    sp.parallelize(model)
    try:
        with torch.no_grad():
            sp_forward(model, **uneven)
        results["uneven"] = None
    except ValueError as e:
        results["uneven"] = str(e)
    if rank == 0:
        torch.save(results, result_path)


@pytest.mark.parametrize("world_size", [
    pytest.param(2, id="ring2"),
    pytest.param(4, id="ulysses2xring2", marks=pytest.mark.slow),  # four ranks: ~17 s
])
def test_ring_attention_matches_the_serial_model(tmp_path, world_size):
    """ring_degree=2 (with ulysses 1, then 2 over 4 ranks): keys and values travel around
    the ring over gloo and the blocks are merged by log-sum-exp; the output equals the
    serial model's."""
    path = tmp_path / "ring.pt"
    spawn_ranks(_ring_worker, world_size, str(path))
    results = torch.load(path)
    print(f"ring (world {world_size}) vs serial: {results}")
    assert results[1] <= TOLERANCE and results[2] <= TOLERANCE, results
    assert "same number of tokens" in results["uneven"]
