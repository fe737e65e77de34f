"""The serving layer of MultiTalk Serve (Ray Serve): storage, job records, schemas,
the ingress (HTTP + handle) and the stage deployments. The model math lives in
``multitalk``; the graph is composed in ``pipeline_graph.py``.

Import submodules directly (``deployments.storage`` ...); this package import stays
cheap and free of Ray so that storage and schemas can be used without a cluster.
"""
