"""Regional ``torch.compile`` of the DiT block (issue 8's compile lever).

What matters for speed is that sampling never recompiles: every step has a new timestep,
every chunk new audio and noise, and the guidance passes alternate between two speakers and
one silent one. These tests count the graphs dynamo hands to the backend over whole
samplings; ``fullgraph=True`` (the stage's default) additionally fails on any graph break.
"""
from __future__ import annotations

import pytest
import torch

from multitalk.checkpoints.tiny import tiny_dit_config, tiny_dit_inputs


class CountingBackend:
    """A ``torch.compile`` backend that records each graph it is given and runs it as is."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def _job_inputs(people: int, audio_start: int = 0, seed: int = 3):
    from multitalk.stages import ChunkJob, ImageConditioning, TextEmbeddings

    inp = tiny_dit_inputs(2)
    cfg = tiny_dit_config()
    g = torch.Generator().manual_seed(seed)
    job = ChunkJob(frames=17, latent_hw=(8, 12), audio_start=audio_start, ref_masks=inp["ref_target_masks"],
                   seed=seed, steps=4)
    audio = torch.randn(people, 60, cfg["audio_blocks"], cfg["audio_channels"], generator=g)
    image = ImageConditioning(inp["clip_fea"], inp["y"])
    text = TextEmbeddings(inp["context"], torch.randn(3, cfg["text_dim"], generator=g))
    return job, audio, image, text


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("batch_guidance", [False, True])
def test_compiled_sampling_never_recompiles_across_steps_and_chunks(tiny_official, batch_guidance):
    from multitalk.stages import DiffusionStage

    backend = CountingBackend()
    eager = DiffusionStage.from_pretrained(str(tiny_official), batch_guidance=batch_guidance)
    compiled = DiffusionStage.from_pretrained(str(tiny_official), batch_guidance=batch_guidance,
                                              compile={"backend": backend})
    job, audio, image, text = _job_inputs(people=2)
    first = compiled.sample(job, audio, image, text)
    after_first_chunk = len(backend.graphs)
    # One graph for the two-speaker passes and one for the silent pass (sequential
    # guidance), or one for the batch: never one per block or per step.
    assert 1 <= after_first_chunk <= 2
    assert torch.allclose(first, eager.sample(job, audio, image, text), atol=1e-5)

    # The next chunk: other audio window, seed and noise; all four steps again.
    job2, audio2, image2, text2 = _job_inputs(people=2, audio_start=8, seed=11)
    second = compiled.sample(job2, audio2, image2, text2)
    assert len(backend.graphs) == after_first_chunk, "a later chunk recompiled the block"
    assert torch.allclose(second, eager.sample(job2, audio2, image2, text2), atol=1e-5)


def test_compiled_block_with_inductor_matches_eager():
    """The default backend (inductor) generates C++ on this CPU; numbers stay within fp32 noise."""
    from multitalk.checkpoints.tiny import tiny_dit

    model = tiny_dit(0)
    inp = tiny_dit_inputs(2)
    with torch.no_grad():
        ref = model(**inp)
        model.compile_repeated_blocks(fullgraph=True)
        out = model(**inp)
        inp["t"] = torch.tensor([333.0])
        again = model(**inp)  # a new timestep: same graph
    assert (out - ref).abs().max() < 1e-4
    assert again.shape == ref.shape
    # Each compiled block's cache holds one entry: the 2-layer model compiled one code path.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_compile_options_are_checked(tiny_official):
    from multitalk.stages import DiffusionStage

    with pytest.raises(ValueError, match="low_vram"):
        DiffusionStage.from_pretrained(str(tiny_official), compile=True, low_vram=True)
    with pytest.raises(ValueError, match="compile must be"):
        DiffusionStage.from_pretrained(str(tiny_official), compile="fast")
