// The step-executor interface: what a backend must do so the host's one decode loop (loop.cpp)
// can drive it. The C++ side of runtimes/executor.py.
//
// An executor runs exactly one forward per call and never samples: the loop does CFG mixing,
// filtering and the draw for every backend alike, so two executors that return equal logits
// generate equal tokens. Call sequence for one chunk of B rows (B = 2n with CFG: n conditional
// rows, then n null-class rows):
//
//   Prefilled p = ex.prefill(class_ids);               // position 0 -> logits for token 0
//   for pos in 1 .. n_holistic + n_patch - 1:
//     logits = ex.decode_step(prev_tokens, pos, *p.cache);  // feeds token pos-1 at position pos
//   images = ex.decode_image(holistic_ids, patch_ids);
//
// A backend is one source file defining a StepExecutor subclass and a factory, registered by
// engine name in backends.cpp (the manifest's "engine" field picks it).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <memory>
#include <string>
#include <vector>

#include "manifest.h"

namespace hita::detail {

// The KV cache of one running sequence. Opaque to the loop; each backend keeps what it needs
// (AOTI: the tensors its decode package updates in place; TensorRT: bound device buffers).
class KvCache {
 public:
  virtual ~KvCache() = default;
};

struct Prefilled {
  at::Tensor logits;               // [B, V] on the executor's device, the GPT's dtype
  std::unique_ptr<KvCache> cache;  // allocated by prefill for these B rows
};

// What an executor declares so the loop can use it without knowing its backend.
struct ExecutorTraits {
  std::string name;                    // short backend name for reports ("aoti")
  c10::Device device{c10::kCPU};       // where its logits live; the loop copies them to the CPU
  int64_t max_rows = 0;                // most rows one prefill accepts (an engine profile's max); 0 = no limit
  std::vector<int64_t> batch_buckets;  // row counts it is built for (engine profiles); empty = any
};

class StepExecutor {
 public:
  virtual ~StepExecutor() = default;
  virtual const ExecutorTraits& traits() const = 0;

  // Runs position 0 (the class token) for every row and allocates the cache.
  //   class_ids: int64 [B] on the CPU, ids in [0, num_classes] (num_classes = CFG null class).
  virtual Prefilled prefill(const at::Tensor& class_ids) = 0;

  // Feeds one token per row at sequence position `pos` (1 .. seq_len - 1), updating `cache`.
  //   tokens: int64 [B] on the CPU, the tokens at sequence index pos - 1.
  //   returns: logits [B, V] predicting sequence index pos.
  virtual at::Tensor decode_step(const at::Tensor& tokens, int64_t pos, KvCache& cache) = 0;

  // Tokens to pixels with the tokenizer decoder.
  //   holistic: int64 [n, n_holistic]; patch: int64 [n, n_patch] (CPU).
  //   returns: float32 [n, 3, H, W], unclamped, nominally in [-1, 1].
  virtual at::Tensor decode_image(const at::Tensor& holistic, const at::Tensor& patch) = 0;
};

// Builds the executor of one engine from a verified manifest; throws HostError (one line) when the
// folder cannot run here (another device kind, another torch version, a missing graph, ...).
using ExecutorFactory = std::unique_ptr<StepExecutor> (*)(const Manifest& manifest, const c10::Device& device);

// The engines compiled into this host ("aoti"), in registration order.
std::vector<std::string> backend_engines();
// The factory for `engine`; HostError when no backend for it is compiled in.
ExecutorFactory backend_for(const std::string& engine);

// Backends (one file each).
std::unique_ptr<StepExecutor> make_aoti_executor(const Manifest& manifest, const c10::Device& device);
#ifdef HITA_WITH_TENSORRT
std::unique_ptr<StepExecutor> make_tensorrt_executor(const Manifest& manifest, const c10::Device& device);
#endif

}  // namespace hita::detail
