// hita::Host: verify the folder, pick the backend named by the manifest's engine, run the loop.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/headeronly/version.h>

#include "executor.h"
#include "hita/host.h"
#include "loop.h"
#include "manifest.h"

namespace hita {
namespace {

c10::Device parse_device(const std::string& device) {
  try {
    c10::Device d(device);
    if (d.is_cpu() || d.is_cuda()) {
      if (d.is_cuda() && !at::hasCUDA())
        throw HostError("device 'cuda' requested but this libtorch has no usable CUDA GPU; use --device cpu");
      return d;
    }
  } catch (const HostError&) {
    throw;
  } catch (const std::exception&) {  // c10 rejects the string; fall through to the one-line message
  }
  throw HostError("device must be 'cpu' or 'cuda[:i]', got '" + device + "'");
}

}  // namespace

struct Host::Impl {
  ModelInfo info;
  std::unique_ptr<detail::StepExecutor> executor;
};

Host::Host(const std::string& artifacts_dir, const std::string& device,
           const std::optional<std::string>& expect_manifest_sha256)
    : impl_(std::make_unique<Impl>()) {
  const c10::Device dev = parse_device(device);
  // Every file is hashed before any package is loaded: loading a .pt2 runs its code.
  detail::VerifiedFolder folder =
      detail::open_artifacts(artifacts_dir, expect_manifest_sha256, detail::backend_engines());
  impl_->info = folder.manifest.info;
  impl_->executor = detail::backend_for(impl_->info.engine)(folder.manifest, dev);
  detail::check_unchanged(artifacts_dir, folder.fingerprints);
}

Host::~Host() = default;

const ModelInfo& Host::info() const { return impl_->info; }

Generation Host::generate(const std::vector<int64_t>& class_ids, const SamplingOptions& options, bool decode_images) {
  return detail::generate(*impl_->executor, impl_->info, class_ids, options, decode_images);
}

std::string torch_version() { return TORCH_VERSION; }

void set_num_threads(int threads) {
  if (threads < 1) throw HostError("threads must be >= 1, got " + std::to_string(threads));
  at::set_num_threads(threads);
}

}  // namespace hita
