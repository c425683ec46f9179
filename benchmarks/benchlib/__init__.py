"""Measuring library behind the scripts in ``benchmarks/`` (one job per module).

- :mod:`.models`: seeded random-weight checkpoints of a GPT preset and the tokenizer preset it pairs with.
- :mod:`.runtimes`: executors from ``hita.runtimes.factory`` over those checkpoints or over exports by
  the project's export driver (reused while the manifest matches); unavailable runtimes say why.
- :mod:`.host`: the C++ host (``hita.jobs.build_cpp``), measured as its own process.
- :mod:`.workload`: the batches (images, CFG on by default), positions, inputs and sampling options.
- :mod:`.steps`: the timed loop step (``decode_one_token`` + ``sample``), interleaved over runtimes,
  and the tokenizer decoder.
- :mod:`.stats`: timing with warm-ups and repeats, and the summary numbers (median, spread).
- :mod:`.machine`: what the machine is, its read bandwidth and matmul rate, and the CPU share other
  processes take meanwhile (the noise indicator of a shared machine).
- :mod:`.floor`: bytes and FLOPs of one decode step, and the roofline floor they give.
- :mod:`.results` and :mod:`.report`: the rows, their ratios, the markdown table and the JSON file.

It lives under ``benchmarks/`` (not in the ``hita`` package) because nothing in the product needs it.
A script run as ``python benchmarks/<script>.py`` has ``benchmarks/`` on ``sys.path``, so it imports
``benchlib`` directly; ``tests/benchmarks/conftest.py`` puts the same folder there for the tests.
"""
