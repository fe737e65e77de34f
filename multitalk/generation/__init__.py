"""The chunk loop both models run, split by concern.

* :mod:`.protocol`: the :class:`~.protocol.Stages` protocol the loop calls (in-process or served);
* :mod:`.planning`: request checks, the clip length, the chunk plan, the inputs decoded;
* :mod:`.loop`: :class:`~.loop.ChunkLoop`, the one encode → sample → decode → write loop,
  with the steps a model supplies (its conditioning per chunk, its chunk job, its length);
* :mod:`.calls`: :class:`~.calls.CallTracker`, the running stage calls of one job;
* :mod:`.local`: :class:`~.local.LocalStages`, the stages in this process;
* :mod:`.speech`: text to speech for jobs that give text.

The models are modules beside this package: :mod:`multitalk.driver` (MultiTalk) and
:mod:`multitalk.infinitetalk` (InfiniteTalk), each a :class:`~.loop.ChunkLoop` subclass with
``generate`` and ``precheck`` (registered in :data:`multitalk.stage_factory.DRIVERS`).
"""
