"""INT8/FP8 calibration from the generator's own sampling runs, quantized ONNX exports, and what they cost.

- :mod:`~hita.calibration.options`: what a calibration run samples and keeps (presets ``ci``,
  ``default``, ``gpt-b``);
- :mod:`~hita.calibration.collect`: ``hita calibrate``: the eager executor driven through the one
  decode loop, recording every graph input (CFG rows, all positions, the KV cache);
- :mod:`~hita.calibration.dataset`: the set on disk (one safetensors file with its own manifest);
- :mod:`~hita.calibration.recipes`: ``int8-weight``, ``int4-weight``, ``int8``, ``fp8``: how each is
  made, the parity thresholds it owes, and the engines that can run it (the one rule the TensorRT
  builder and the runtime factory apply; ``--kv-cache`` is refused there, with the reason);
- :mod:`~hita.calibration.graph_passes` / :mod:`~hita.calibration.quantize`: one graph through
  ONNX Runtime's quantizers;
- :mod:`~hita.calibration.export`: a verified fp32 ONNX folder -> a quantized artifacts folder;
- :mod:`~hita.calibration.report`: ``hita calibrate --report`` (JSON, table, image grid), and the
  accuracy a folder's manifest recorded (for benchmarks);
- :mod:`~hita.calibration.class_accuracy`: the report's class accuracy of free-run images, fp32 vs
  quantized on the same seeds, judged by the classifier shipped with the embedded model.

Heavy libraries (onnx, onnxruntime, its quantization tools) are imported inside functions, so
``import hita.calibration`` stays light.
"""
