// Mirrors runtimes/loop.py: sequence index t = 0 .. L-1 (holistic tokens, then patch tokens);
// token t is predicted at position t (prefill = position 0, then decode_step(token[t-1], pos=t))
// and drawn with NoiseStream(seed).uniform(step=t, rows, row_offset).
#include "loop.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full_like.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>

#include "sampling.h"

namespace hita::detail {
namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

void check_class_ids(const std::vector<int64_t>& ids, const ModelInfo& info) {
  if (ids.empty()) throw HostError("no class ids given; pass at least one class id per image to generate");
  for (int64_t c : ids)
    if (c < 0 || c >= info.num_classes)
      throw HostError("class id " + std::to_string(c) + " out of range [0, " + std::to_string(info.num_classes) +
                      ") for this GPT; use ids 0.." + std::to_string(info.num_classes - 1) + " (id " +
                      std::to_string(info.num_classes) + " is the CFG null class, added by the loop)");
}

// Images per chunk so that images * rows_per_image fits the executor (executor.py chunk_rows):
// the largest declared bucket that fits, else max_rows; 0 = no limit.
int64_t chunk_images(const ExecutorTraits& t, int64_t rows_per_image) {
  int64_t cap = 0;
  for (int64_t b : t.batch_buckets)
    if (b % rows_per_image == 0 && (t.max_rows == 0 || b <= t.max_rows)) cap = std::max(cap, b);
  if (cap == 0) cap = t.max_rows;
  if (cap == 0) return 0;
  if (cap < rows_per_image)
    throw HostError(t.name + " runs at most " + std::to_string(cap) + " rows per step, and one image needs " +
                    std::to_string(rows_per_image) +
                    " (CFG doubles the rows); rebuild the engine with a larger batch or set --cfg-scale 1");
  return cap / rows_per_image;
}

// One sequence of m images that fits the executor (loop.py _generate_chunk); writes `out` [m, L]
// and adds its timings to `g`.
void generate_chunk(StepExecutor& ex, const ModelInfo& info, const at::Tensor& ids, const SamplingOptions& o,
                    uint64_t row_offset, at::Tensor out, Generation& g) {
  const int64_t m = ids.size(0), L = info.seq_len();
  auto t0 = Clock::now();
  // prefill(executor, class_ids, opts): with CFG the null-class rows follow the conditional ones.
  const at::Tensor rows = o.use_cfg() ? at::cat({ids, at::full_like(ids, info.null_class())}) : ids;  // [B]
  Prefilled p = ex.prefill(rows);
  at::Tensor logits = guided_logits(p.logits, o, -1);                                 // [m, V]
  out.select(1, 0).copy_(sample(logits, o, uniforms(o, 0, m, row_offset)));
  g.prefill_ms += ms_since(t0);

  for (int64_t t = 1; t < L; ++t) {
    t0 = Clock::now();
    at::Tensor fed = out.select(1, t - 1);                                            // [m]
    if (o.use_cfg()) fed = at::cat({fed, fed});                                       // [2m]: null rows too
    at::Tensor raw = ex.decode_step(fed, t, *p.cache).to(at::kCPU, at::kFloat);       // [B, V]
    g.forward_ms[t - 1] += ms_since(t0);
    logits = guided_logits(raw, o, t - 1);                                            // [m, V]
    out.select(1, t).copy_(sample(logits, o, uniforms(o, t, m, row_offset)));
    g.step_ms[t - 1] += ms_since(t0);
  }
}

// decode_image + to_uint8: clamp(127.5 x + 128, 0, 255), truncating cast.
std::vector<Image> decode_images_u8(StepExecutor& ex, const ModelInfo& info, const at::Tensor& tokens) {
  at::Tensor hol = tokens.slice(1, 0, info.n_holistic).contiguous();                 // [n, n_holistic]
  at::Tensor patch = tokens.slice(1, info.n_holistic).contiguous();                  // [n, n_patch]
  at::Tensor x = ex.decode_image(hol, patch).to(at::kCPU, at::kFloat);               // [n, 3, H, W]
  x = at::clamp(x.mul(127.5).add(128.0), 0, 255);
  at::Tensor u8 = x.permute({0, 2, 3, 1}).to(at::kByte).contiguous();                // [n, H, W, 3]
  const int h = static_cast<int>(u8.size(1)), w = static_cast<int>(u8.size(2));
  const size_t bytes = static_cast<size_t>(h) * w * 3;
  const uint8_t* px = u8.data_ptr<uint8_t>();
  std::vector<Image> images;
  for (int64_t i = 0; i < u8.size(0); ++i)
    images.push_back({w, h, std::vector<uint8_t>(px + i * bytes, px + (i + 1) * bytes)});
  return images;
}

}  // namespace

Generation generate(StepExecutor& ex, const ModelInfo& info, const std::vector<int64_t>& class_ids,
                    const SamplingOptions& o, bool decode_images) {
  o.validate();
  check_class_ids(class_ids, info);
  c10::InferenceMode guard;
  const auto t_start = Clock::now();
  const int64_t n = static_cast<int64_t>(class_ids.size()), L = info.seq_len();
  at::Tensor ids = at::empty({n}, at::kLong);                                         // [n]
  std::copy(class_ids.begin(), class_ids.end(), ids.data_ptr<int64_t>());
  at::Tensor tokens = at::empty({n, L}, at::kLong);                                   // [n, L]

  Generation g;
  g.class_ids = class_ids;
  g.step_ms.assign(static_cast<size_t>(L - 1), 0.0);
  g.forward_ms.assign(static_cast<size_t>(L - 1), 0.0);
  const int64_t per = chunk_images(ex.traits(), o.use_cfg() ? 2 : 1);
  const int64_t chunk = per > 0 ? per : n;
  for (int64_t a = 0; a < n; a += chunk) {
    const int64_t b = std::min(a + chunk, n);
    generate_chunk(ex, info, ids.slice(0, a, b), o, o.row_offset + static_cast<uint64_t>(a), tokens.slice(0, a, b), g);
  }
  g.tokens.assign(static_cast<size_t>(n), std::vector<int64_t>(static_cast<size_t>(L)));
  const int64_t* tp = tokens.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) std::copy(tp + i * L, tp + (i + 1) * L, g.tokens[i].begin());

  if (decode_images) {
    const auto t0 = Clock::now();
    g.images = decode_images_u8(ex, info, tokens);
    g.decode_image_ms = ms_since(t0);
  }
  g.total_ms = ms_since(t_start);
  return g;
}

}  // namespace hita::detail
