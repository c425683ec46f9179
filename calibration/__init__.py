"""INT8/FP8 calibration from the generator's own sampling runs, quantized ONNX exports, and what they cost.

- :mod:`~hita.calibration.options`: what a calibration run samples and keeps (presets ``ci``,
  ``default``, ``gpt-b``);
- :mod:`~hita.calibration.collect`: ``hita calibrate``: the eager executor driven through the one
  decode loop, recording every graph input (CFG rows, all positions, the KV cache);
- :mod:`~hita.calibration.dataset`: the set on disk (one safetensors file with its own manifest);
- :mod:`~hita.calibration.recipes`: ``int8-weight``, ``int4-weight``, ``int8``, ``fp8``: how each is
  made and the parity thresholds it owes;
- :mod:`~hita.calibration.graph_passes` / :mod:`~hita.calibration.quantize`: one graph through
  ONNX Runtime's quantizers;
- :mod:`~hita.calibration.export`: a verified fp32 ONNX folder -> a quantized artifacts folder;
- :mod:`~hita.calibration.report`: ``hita calibrate --report`` (JSON, table, image grid).

Heavy libraries (onnx, onnxruntime, its quantization tools) are imported inside functions, so
``import hita.calibration`` stays light.
"""
