// Mirrors runtimes/sampling.py line by line; comments name the Python line each block mirrors.
#include "sampling.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

namespace hita {

// ----------------------------------------------------------------------------------------------
// Options and noise (public API, hita/host.h)
// ----------------------------------------------------------------------------------------------

void SamplingOptions::validate() const {
  if (!std::isfinite(cfg_scale)) throw HostError("cfg_scale must be a finite number");
  if (cfg_scale < 1.0)
    throw HostError("cfg_scale " + std::to_string(cfg_scale) + " < 1 is not supported; use cfg_scale=1.0 for no "
                    "guidance or a value > 1 for guidance");
  if (cfg_interval < -1)
    throw HostError("cfg_interval must be an integer >= -1; use -1 for guidance on every step or k >= 0 to stop "
                    "guidance after decode step k");
  if (!std::isfinite(temperature) || temperature < 0)
    throw HostError("temperature must be a finite number >= 0; use 0 for greedy decoding or 1.0 for plain sampling");
  if (top_k < 0) throw HostError("top_k must be an integer >= 0; use 0 to disable top-k filtering");
  if (!(top_p > 0.0 && top_p <= 1.0)) throw HostError("top_p must lie in (0, 1]; use 1.0 to disable nucleus filtering");
}

bool SamplingOptions::cfg_active(int64_t step) const {
  if (!use_cfg()) return false;
  return !(cfg_interval > -1 && step > cfg_interval);
}

uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

uint64_t noise_bits(uint64_t seed, uint64_t step, uint64_t row) {
  constexpr uint64_t g = 0x9E3779B97F4A7C15ULL;  // unsigned arithmetic wraps modulo 2^64
  uint64_t h = mix64(seed + g);
  h = mix64(h ^ (step + 2 * g));
  return mix64(h ^ (row + 3 * g));
}

double noise_uniform(uint64_t seed, uint64_t step, uint64_t row) {
  return static_cast<double>(noise_bits(seed, step, row) >> 11) * 0x1.0p-53;
}

namespace detail {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// filter_logits(logits, top_k, top_p)
at::Tensor filter_logits(at::Tensor logits, int64_t top_k, double top_p) {
  if (top_k > 0) {
    const int64_t k = std::min<int64_t>(top_k, logits.size(-1));
    at::Tensor kth = std::get<0>(logits.topk(k, -1)).slice(-1, k - 1);  // topk(...).values[..., -1:]  [n, 1]
    logits = logits.masked_fill(logits.lt(kth), kNegInf);
  }
  if (top_p < 1.0) {
    auto [sorted_logits, sorted_idx] = logits.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true);  // [n, V]
    at::Tensor cum = sorted_logits.softmax(-1).cumsum(-1);
    at::Tensor remove = cum.gt(top_p);
    remove.slice(-1, 1).copy_(remove.slice(-1, 0, -1).clone());  // remove[..., 1:] = remove[..., :-1].clone()
    remove.select(-1, 0).fill_(false);                            // remove[..., 0] = False
    at::Tensor mask = remove.scatter(-1, sorted_idx, remove);     // back to vocab order
    logits = logits.masked_fill(mask, kNegInf);
  }
  return logits;
}

}  // namespace

at::Tensor guided_logits(const at::Tensor& raw_in, const SamplingOptions& o, int64_t step) {
  at::Tensor raw = raw_in.to(at::kCPU, at::kFloat);                       // [B, V]
  if (!o.use_cfg()) return raw;
  if (o.cfg_active(step)) {
    auto halves = raw.chunk(2, 0);                                        // cond, uncond: [n, V] each
    return halves[1].add(halves[0].sub(halves[1]).mul(o.cfg_scale));     // uncond + scale * (cond - uncond)
  }
  return raw.slice(0, 0, raw.size(0) / 2);                                // cond rows only
}

at::Tensor uniforms(const SamplingOptions& o, int64_t step, int64_t rows, uint64_t row_offset) {
  at::Tensor u = at::empty({rows}, at::kDouble);                          // [rows]
  double* p = u.data_ptr<double>();
  for (int64_t r = 0; r < rows; ++r)
    p[r] = noise_uniform(o.seed, static_cast<uint64_t>(step), row_offset + static_cast<uint64_t>(r));
  return u;
}

at::Tensor sample(at::Tensor logits, const SamplingOptions& o, const at::Tensor& u) {
  logits = logits.to(at::kCPU, at::kFloat);                               // [n, V]
  if (o.temperature == 0) return logits.argmax(-1);
  logits = logits.div(std::max(o.temperature, 1e-5));
  logits = filter_logits(logits, o.top_k, o.top_p);
  at::Tensor probs = logits.softmax(-1);                                  // [n, V] float32
  at::Tensor cdf = probs.to(at::kDouble).cumsum(-1);                      // [n, V] float64
  at::Tensor total = cdf.slice(1, cdf.size(1) - 1);                       // [n, 1]
  if (!total.isfinite().all().item<bool>() || total.le(0).any().item<bool>())
    throw HostError("a row has no finite probability mass after softmax: the package returned NaN or infinite "
                    "logits (check the export's precision, or compare with `hita parity`)");
  at::Tensor target = u.unsqueeze(1).mul(total);                          // [n, 1]
  at::Tensor idx = at::searchsorted(cdf, target, /*out_int32=*/false, /*right=*/true).select(1, 0);  // [n]
  // u * total can round up to total itself; then take the last token with non-zero probability.
  at::Tensor last = probs.gt(0).to(at::kLong).cumsum(-1).argmax(-1);     // [n]
  return idx.minimum(last);
}

}  // namespace detail
}  // namespace hita
