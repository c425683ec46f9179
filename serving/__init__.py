"""Serving Hita generation at scale: Triton Inference Server with in-flight batching.

Layers, each a small module with one job:

- :mod:`~hita.serving.protocol`: the request and response tensors (names, Triton types, defaults),
  declared once for the model config, the model and the clients.
- :mod:`~hita.serving.requests`: turns one request's tensors into a checked
  :class:`~hita.serving.requests.GenerationRequest`; errors name the field.
- :mod:`~hita.serving.scheduler`: one thread owns one step executor; requests join the running
  batch at the next step and leave when done (in-flight batching); sampling is the decode loop's.
- :mod:`~hita.serving.triton_model`: the Triton Python-backend model around the scheduler.
- :mod:`~hita.serving.repository`: writes a standard Triton model repository (``config.pbtxt``,
  ``model.py``, the artifacts).
- :mod:`~hita.serving.launcher`: finds the ``tritonserver`` binary that the ``nvidia-pytriton`` wheel
  bundles, prepares its Python backend for this interpreter and runs, watches and stops the server.
- :mod:`~hita.serving.client`: ``tritonclient`` helpers (HTTP or gRPC) that return uint8 images.
- :mod:`~hita.serving.artifacts`: the ONNX export a server runs (per-row decode positions), cached
  and checked with rows at different positions.
- :mod:`~hita.serving.serve`: ``hita serve`` as a library call (model files, repository, server,
  signals).

Nothing here imports Triton, ``tritonclient`` or ``pytriton`` at module level: ``import hita`` and the
CLI stay light, and the serving extras are needed only by the commands that use them.
"""
