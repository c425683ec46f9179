// The host's torch-facing part: AOTInductor packages, the decode loop and the sampler.
//
// The loop and the sampler mirror runtimes/loop.py and runtimes/sampling.py line by line with the
// same ATen operators (same kernels, same order of operations, same dtypes), so equal logits give
// equal tokens. Comments name the Python line each block mirrors.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/searchsorted.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/headeronly/version.h>

#include <chrono>
#include <cmath>
#include <limits>
#include <string>

#include "hita/host.h"
#include "manifest.h"
#include "util.h"

namespace hita {

using Loader = torch::inductor::AOTIModelPackageLoader;

// ----------------------------------------------------------------------------------------------
// Options and noise
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

void write_png(const std::string& path, const Image& image) {
  if (image.rgb.size() != static_cast<size_t>(image.width) * image.height * 3)
    throw HostError(path + ": image buffer does not hold width x height x 3 bytes");
  try {
    detail::write_png_rgb(path, image.width, image.height, image.rgb.data());
  } catch (const std::runtime_error& e) {
    throw HostError(e.what());
  }
}

std::string torch_version() { return TORCH_VERSION; }

void set_num_threads(int threads) {
  if (threads < 1) throw HostError("threads must be >= 1, got " + std::to_string(threads));
  at::set_num_threads(threads);
}

// ----------------------------------------------------------------------------------------------
// Sampling (runtimes/sampling.py)
// ----------------------------------------------------------------------------------------------

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// filter_logits(logits, top_k, top_p)
at::Tensor filter_logits(at::Tensor logits, int64_t top_k, double top_p) {
  if (top_k > 0) {
    const int64_t k = std::min<int64_t>(top_k, logits.size(-1));
    at::Tensor kth = std::get<0>(logits.topk(k, -1)).slice(-1, k - 1);  // topk(...).values[..., -1:]
    logits = logits.masked_fill(logits.lt(kth), kNegInf);
  }
  if (top_p < 1.0) {
    auto [sorted_logits, sorted_idx] = logits.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true);
    at::Tensor cum = sorted_logits.softmax(-1).cumsum(-1);
    at::Tensor remove = cum.gt(top_p);
    remove.slice(-1, 1).copy_(remove.slice(-1, 0, -1).clone());  // remove[..., 1:] = remove[..., :-1].clone()
    remove.select(-1, 0).fill_(false);                              // remove[..., 0] = False
    at::Tensor mask = remove.scatter(-1, sorted_idx, remove);
    logits = logits.masked_fill(mask, kNegInf);
  }
  return logits;
}

// sample(logits, opts, u): greedy, or inverse CDF at one uniform per row.
at::Tensor sample(at::Tensor logits, const SamplingOptions& o, const at::Tensor& u) {
  logits = logits.to(at::kCPU, at::kFloat);
  if (o.temperature == 0) return logits.argmax(-1);
  logits = logits.div(std::max(o.temperature, 1e-5));
  logits = filter_logits(logits, o.top_k, o.top_p);
  at::Tensor probs = logits.softmax(-1);                        // float32
  at::Tensor cdf = probs.to(at::kDouble).cumsum(-1);            // float64
  at::Tensor total = cdf.slice(1, cdf.size(1) - 1);             // [n, 1]
  if (!total.isfinite().all().item<bool>() || total.le(0).any().item<bool>())
    throw HostError("a row has no finite probability mass after softmax: the package returned NaN or infinite "
                    "logits (check the export's precision, or compare with `hita parity`)");
  at::Tensor target = u.unsqueeze(1).mul(total);                   // [n, 1]
  at::Tensor idx = at::searchsorted(cdf, target, /*out_int32=*/false, /*right=*/true).select(1, 0);
  at::Tensor last = probs.gt(0).to(at::kLong).cumsum(-1).argmax(-1);
  return idx.minimum(last);
}

// guided_logits(raw, opts, step) (runtimes/loop.py)
at::Tensor guided_logits(const at::Tensor& raw_in, const SamplingOptions& o, int64_t step) {
  at::Tensor raw = raw_in.to(at::kCPU, at::kFloat);
  if (!o.use_cfg()) return raw;
  if (o.cfg_active(step)) {
    auto halves = raw.chunk(2, 0);                    // cond, uncond
    return halves[1].add(halves[0].sub(halves[1]).mul(o.cfg_scale));  // uncond + scale * (cond - uncond)
  }
  return raw.slice(0, 0, raw.size(0) / 2);
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// Host
// ----------------------------------------------------------------------------------------------

struct Host::Impl {
  detail::Artifacts art;
  c10::Device device{c10::kCPU};
  std::unique_ptr<Loader> prefill, decode_step, decoder;
};

Host::Host(const std::string& artifacts_dir, const std::string& device) : impl_(std::make_unique<Impl>()) {
  try {
    impl_->device = c10::Device(device);
  } catch (const std::exception&) {
    throw HostError("device must be 'cpu' or 'cuda[:i]', got '" + device + "'");
  }
  const std::string kind = impl_->device.is_cuda() ? "cuda" : impl_->device.is_cpu() ? "cpu" : device;
  impl_->art = detail::verify_artifacts(artifacts_dir, kind, TORCH_VERSION);
  const c10::DeviceIndex index = impl_->device.is_cuda() ? std::max<c10::DeviceIndex>(impl_->device.index(), 0) : -1;
  auto load = [&](const std::string& path) {
    try {
      return std::make_unique<Loader>(path, "model", false, 1, index);
    } catch (const std::exception& e) {
      std::string what = e.what();
      throw HostError(path + ": AOTInductor could not load the package (" + what.substr(0, what.find('\n')) +
                      "); re-run `hita export --engine aoti`");
    }
  };
  impl_->prefill = load(impl_->art.prefill);
  impl_->decode_step = load(impl_->art.decode_step);
  impl_->decoder = load(impl_->art.decoder);
}

Host::~Host() = default;

const ModelInfo& Host::info() const { return impl_->art.info; }

Generation Host::generate(const std::vector<int64_t>& class_ids, const SamplingOptions& o, bool decode_images) {
  o.validate();
  const ModelInfo& info = impl_->art.info;
  if (class_ids.empty()) throw HostError("no class ids given; pass at least one class id per image to generate");
  for (int64_t c : class_ids)
    if (c < 0 || c >= info.num_classes)
      throw HostError("class id " + std::to_string(c) + " out of range [0, " + std::to_string(info.num_classes) +
                      ") for this GPT; use ids 0.." + std::to_string(info.num_classes - 1) + " (id " +
                      std::to_string(info.num_classes) + " is the CFG null class, added by the loop)");
  c10::InferenceMode guard;
  const auto t_start = std::chrono::steady_clock::now();
  const int64_t n = static_cast<int64_t>(class_ids.size());
  const int64_t L = info.seq_len();
  const auto dev = impl_->device;
  const auto on_dev = at::TensorOptions().dtype(at::kLong).device(dev);

  Generation out;
  out.class_ids = class_ids;
  at::Tensor tokens = at::empty({n, L}, at::kLong);                        // [n, L] on the CPU
  at::Tensor u = at::empty({n}, at::kDouble);                              // [n]
  auto uniforms = [&](int64_t step) {                                      // NoiseStream.uniform(step, n, row_offset)
    double* p = u.data_ptr<double>();
    for (int64_t r = 0; r < n; ++r) p[r] = noise_uniform(o.seed, static_cast<uint64_t>(step), o.row_offset + r);
    return u;
  };

  // prefill(executor, class_ids, opts)
  auto t0 = std::chrono::steady_clock::now();
  const int64_t rows = o.use_cfg() ? 2 * n : n;
  at::Tensor ids = at::empty({rows}, at::kLong);
  for (int64_t r = 0; r < rows; ++r) ids.data_ptr<int64_t>()[r] = r < n ? class_ids[r] : info.num_classes;
  std::vector<at::Tensor> outs = impl_->prefill->run({ids.to(dev)});
  if (static_cast<int64_t>(outs.size()) != 1 + 2 * info.n_layer)
    throw HostError("prefill package returned " + std::to_string(outs.size()) + " outputs, expected logits + 2 x " +
                    std::to_string(info.n_layer) + " caches; re-run `hita export --engine aoti`");
  std::vector<at::Tensor> step_in(2 + 2 * info.n_layer);                  // token, position, k0, v0, ...
  for (int64_t i = 0; i < 2 * info.n_layer; ++i) step_in[2 + i] = outs[1 + i];  // the cache, updated in place
  at::Tensor logits = guided_logits(outs[0], o, -1);
  tokens.select(1, 0).copy_(sample(logits, o, uniforms(0)));
  out.prefill_ms = ms_since(t0);

  // for t in 1..L-1: decode_one_token + sample
  out.step_ms.reserve(static_cast<size_t>(L - 1));
  out.forward_ms.reserve(static_cast<size_t>(L - 1));
  for (int64_t t = 1; t < L; ++t) {
    t0 = std::chrono::steady_clock::now();
    at::Tensor fed = tokens.select(1, t - 1);                              // [n]
    if (o.use_cfg()) fed = at::cat({fed, fed});                            // [2n]
    step_in[0] = fed.to(dev).contiguous();
    step_in[1] = at::full({1}, t, on_dev);                                 // position [1]
    at::Tensor raw = impl_->decode_step->run(step_in).at(0).to(at::kCPU, at::kFloat);  // [B, V]
    out.forward_ms.push_back(ms_since(t0));
    logits = guided_logits(raw, o, t - 1);
    tokens.select(1, t).copy_(sample(logits, o, uniforms(t)));
    out.step_ms.push_back(ms_since(t0));
  }
  out.tokens.assign(static_cast<size_t>(n), std::vector<int64_t>(static_cast<size_t>(L)));
  const int64_t* tp = tokens.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) std::copy(tp + i * L, tp + (i + 1) * L, out.tokens[i].begin());

  if (decode_images) {
    // decode_image + to_uint8 (runtimes/loop.py): clamp(127.5 x + 128, 0, 255), truncating cast.
    t0 = std::chrono::steady_clock::now();
    at::Tensor hol = tokens.slice(1, 0, info.n_holistic).contiguous().to(dev);
    at::Tensor patch = tokens.slice(1, info.n_holistic).contiguous().to(dev);
    std::vector<at::Tensor> img = impl_->decoder->run({hol, patch});
    at::Tensor x = img.at(0).to(at::kCPU, at::kFloat);                    // [n, 3, H, W]
    x = at::clamp(x.mul(127.5).add(128.0), 0, 255);
    at::Tensor u8 = x.permute({0, 2, 3, 1}).to(at::kByte).contiguous();   // [n, H, W, 3]
    const int h = static_cast<int>(u8.size(1)), w = static_cast<int>(u8.size(2));
    const uint8_t* p = u8.data_ptr<uint8_t>();
    for (int64_t i = 0; i < n; ++i) {
      Image im;
      im.width = w;
      im.height = h;
      im.rgb.assign(p + i * h * w * 3, p + (i + 1) * h * w * 3);
      out.images.push_back(std::move(im));
    }
    out.decode_image_ms = ms_since(t0);
  }
  out.total_ms = ms_since(t_start);
  return out;
}

}  // namespace hita
