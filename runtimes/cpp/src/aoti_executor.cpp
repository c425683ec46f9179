// AOTInductor backend: the three .pt2 packages of `hita export --engine aoti` (runtimes/aoti.py).
//
// An AOTInductor package is a compiled shared library tied to the device kind and the exact torch
// version that built it, so both are checked before anything is loaded. KV cache: prefill.pt2
// returns a fresh cache; decode_step.pt2 writes slot `pos` of each cache tensor in place and
// returns only the logits (see export/aoti.py for why).
#include <ATen/ops/full.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/headeronly/version.h>

#include <stdlib.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <optional>
#include <stdexcept>

#include "executor.h"
#include "folder.h"

namespace hita::detail {
namespace {

using Loader = torch::inductor::AOTIModelPackageLoader;
constexpr const char* kFix = "re-run `hita export --engine aoti`";

// decode_step.pt2's argument list for one sequence: token, position, k0, v0, k1, ...; the caches
// are the tensors prefill returned, updated in place by every step.
class AotiCache : public KvCache {
 public:
  std::vector<at::Tensor> args;
  int64_t rows = 0;
};

// Python: check_aoti_manifest.
void check_manifest(const Manifest& m, const c10::Device& device) {
  const ModelInfo& info = m.info;
  const std::string kind = device.is_cuda() ? "cuda" : "cpu";
  if (info.device != kind)
    throw HostError(m.root + ": packages were compiled for device '" + info.device + "' and cannot run on '" + kind +
                    "'; export for this device with `hita export --engine aoti --device " + kind +
                    "` or run with --device " + info.device);
  if (public_version(info.torch_version) != public_version(TORCH_VERSION))
    throw HostError(m.root + ": packages were compiled with torch " + info.torch_version +
                    " but this host uses libtorch " + TORCH_VERSION +
                    "; AOTInductor packages load only in the torch version that built them; re-export with this "
                    "torch or rebuild the host against torch " + public_version(info.torch_version));
  m.graph("decoder");
  m.graph("prefill");
  const GraphEntry& step = m.graph("decode_step");
  const std::vector<std::string> past(step.inputs.begin() + std::min<size_t>(2, step.inputs.size()), step.inputs.end());
  if (!step.mutates || *step.mutates != past || step.outputs != std::vector<std::string>{"logits"}) {
    std::string outs;
    for (const auto& o : step.outputs) outs += (outs.empty() ? "'" : ", '") + o + "'";
    throw HostError(m.root + ": decode_step.pt2 does not declare the in-place KV cache this runtime drives (outputs [" +
                    outs + "]); " + kFix + " with this hita");
  }
}

class AotiExecutor : public StepExecutor {
 public:
  AotiExecutor(const Manifest& m, const c10::Device& device) : info_(m.info) {
    traits_.name = "aoti";
    traits_.device = device;
    // The packages take any batch; like runtimes/aoti.py no row limit is declared, so a request
    // runs as one chunk and draws exactly what the Python loop draws.
    const c10::DeviceIndex index = device.is_cuda() ? std::max<c10::DeviceIndex>(device.index(), 0) : -1;
    prefill_ = load(m, "prefill", index);
    decode_ = load(m, "decode_step", index);
    decoder_ = load(m, "decoder", index);
  }

  const ExecutorTraits& traits() const override { return traits_; }

  Prefilled prefill(const at::Tensor& class_ids) override {
    std::vector<at::Tensor> outs = prefill_->run({class_ids.to(traits_.device, at::kLong).contiguous()});
    if (static_cast<int64_t>(outs.size()) != 1 + 2 * info_.n_layer)
      throw HostError("prefill.pt2 returned " + std::to_string(outs.size()) + " outputs, expected logits + 2 x " +
                      std::to_string(info_.n_layer) + " caches; " + kFix);
    auto cache = std::make_unique<AotiCache>();
    cache->rows = class_ids.size(0);
    cache->args.resize(2);                                                // token, position: set per step
    cache->args.insert(cache->args.end(), outs.begin() + 1, outs.end());  // 2 x n_layer [B, H, C, D]
    return {outs[0], std::move(cache)};                                   // logits [B, V]
  }

  at::Tensor decode_step(const at::Tensor& tokens, int64_t pos, KvCache& kv) override {
    auto& cache = dynamic_cast<AotiCache&>(kv);
    if (tokens.dim() != 1 || tokens.size(0) != cache.rows)
      throw std::invalid_argument("aoti.decode_step expects [" + std::to_string(cache.rows) + "] tokens");
    if (pos < 1 || pos >= info_.seq_len())
      throw std::invalid_argument("decode position " + std::to_string(pos) + " out of range [1, " +
                                  std::to_string(info_.seq_len() - 1) + "]");
    cache.args[0] = tokens.to(traits_.device, at::kLong).contiguous();                   // [B]
    cache.args[1] = at::full({1}, pos, at::TensorOptions().dtype(at::kLong).device(traits_.device));  // [1]
    return decode_->run(cache.args).at(0);                                              // [B, V]
  }

  at::Tensor decode_image(const at::Tensor& holistic, const at::Tensor& patch) override {
    std::vector<at::Tensor> out = decoder_->run({holistic.to(traits_.device, at::kLong).contiguous(),
                                                 patch.to(traits_.device, at::kLong).contiguous()});
    return out.at(0).to(at::kFloat);                                                     // [n, 3, H, W]
  }

 private:
  // A package is code: load a private copy made from bytes whose sha256 was just checked, so a file
  // swapped in the artifacts folder after open_artifacts cannot run (Python: verified_copy).
  static std::string private_copy(const Manifest& m, const std::string& file, const std::string& dir) {
    const std::optional<std::string> bytes = Folder(m.root).read(file);
    const auto entry = m.files.find(file);
    if (!bytes || entry == m.files.end() || sha256_hex(*bytes) != entry->second.sha256)
      throw HostError(m.path(file) + ": changed after the manifest was checked (sha256 differs); refusing to load "
                      "it; make sure nothing writes to the artifacts folder");
    const std::string path = dir + "/" + file;
    std::ofstream out(path, std::ios::binary);
    out.write(bytes->data(), static_cast<std::streamsize>(bytes->size()));
    if (!out.flush()) throw HostError(path + ": cannot write a private copy of the package (disk full?)");
    return path;
  }

  static std::unique_ptr<Loader> load(const Manifest& m, const std::string& graph, c10::DeviceIndex index) {
    const std::string& file = m.graph(graph).file;
    char tmpl[] = "/tmp/hita-aoti-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) throw HostError("cannot create a private folder in /tmp for the packages");
    const std::string dir = tmpl;
    struct Cleanup {
      std::string dir;
      ~Cleanup() { std::filesystem::remove_all(dir); }
    } cleanup{dir};
    const std::string copy = private_copy(m, file, dir);
    try {
      return std::make_unique<Loader>(copy, "model", false, 1, index);
    } catch (const std::exception& e) {
      const std::string what = e.what();
      throw HostError(file + ": AOTInductor could not load the package (" + what.substr(0, what.find('\n')) + "); " +
                      kFix);
    }
  }

  ModelInfo info_;
  ExecutorTraits traits_;
  std::unique_ptr<Loader> prefill_, decode_, decoder_;
};

}  // namespace

std::unique_ptr<StepExecutor> make_aoti_executor(const Manifest& manifest, const c10::Device& device) {
  check_manifest(manifest, device);
  return std::make_unique<AotiExecutor>(manifest, device);
}

}  // namespace hita::detail
