// TensorRT backend: the three .engine files of `hita export --engine tensorrt` (runtimes/tensorrt.py).
//
// Compiled in when CMake finds TensorRT (-DHITA_WITH_TENSORRT=ON). A TensorRT engine is tied to
// the TensorRT version and the GPU that built it, unless built version- or hardware-compatible;
// both are checked against the manifest before a byte is deserialized, and a mismatch is one line
// with the rebuild command. Buffers are libtorch CUDA tensors bound by address; the engines run
// with enqueueV3 on a blocking stream of this backend, which orders them after the loop's own
// copies on the default stream without explicit events. The decode step's cache is aliased when
// the engine reports it (TensorScatter, TensorRT's in-place KV-cache update), else ping-ponged
// between two sets.
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <ATen/ops/empty.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <stdexcept>

#include "executor.h"

namespace hita::detail {
namespace {

using json = nlohmann::json;
constexpr const char* kFix = "rebuild it here: hita export --engine tensorrt --from-onnx ONNX_DIR --out DIR";

class TrtLogger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "tensorrt: " << msg << "\n";
  }
};

void check_cuda(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess) throw HostError(what + ": " + cudaGetErrorString(e));
}

at::ScalarType dtype_of(const std::string& precision) {
  if (precision == "bfloat16") return at::kBFloat16;
  if (precision == "float16") return at::kHalf;
  return at::kFloat;
}

// "10.16.0.72" -> "10.16.0"; the library's int version 101600 -> "10.16.0".
std::string three(const std::string& v) {
  size_t dots = 0, i = 0;
  for (; i < v.size(); ++i)
    if (v[i] == '.' && ++dots == 3) break;
  return v.substr(0, i);
}
std::string lib_version() {
  const int32_t v = getInferLibVersion();
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

// Python: hita.export.tensorrt.check_engine_host.
void check_manifest(const Manifest& m, int device) {
  const json versions = json::parse(m.versions_json);
  const json options = json::parse(m.options_json);
  const json builder = options.value("builder", json::object());
  const std::string built = versions.value("tensorrt", std::string("unknown"));
  if (three(built) != lib_version() && !builder.value("version_compatible", false))
    throw HostError(m.root + ": engines built with TensorRT " + built + ", this host links TensorRT " + lib_version() +
                    "; " + kFix);
  cudaDeviceProp prop{};
  check_cuda(cudaGetDeviceProperties(&prop, device), "cannot query the CUDA device");
  const std::string here = std::to_string(prop.major) + "." + std::to_string(prop.minor);
  const std::string level = builder.value("hardware_compat", std::string("none"));
  const std::string cc = versions.value("compute_capability", std::string("unknown"));
  if (level == "ampere+" ? prop.major < 8 : cc != here)
    throw HostError(m.root + ": engines built for compute capability " + cc + " (" +
                    versions.value("gpu", std::string("unknown GPU")) + "), this GPU is " + prop.name + " (compute " +
                    here + "); " + kFix);
  for (const char* g : {"decoder", "prefill", "decode_step"}) m.graph(g);
}

nvinfer1::Dims dims_of(const at::Tensor& t) {
  nvinfer1::Dims d{};
  d.nbDims = static_cast<int32_t>(t.dim());
  for (int64_t i = 0; i < t.dim(); ++i) d.d[i] = t.size(i);
  return d;
}

// One engine and its execution context.
class Engine {
 public:
  Engine(nvinfer1::IRuntime& runtime, const Manifest& m, const std::string& graph) : file_(m.graph(graph).file) {
    std::ifstream in(m.path(file_), std::ios::binary);
    const std::vector<char> plan((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    engine_.reset(runtime.deserializeCudaEngine(plan.data(), plan.size()));
    if (!engine_) throw HostError(file_ + ": TensorRT refused to deserialize it; " + kFix);
    context_.reset(engine_->createExecutionContext());
    if (!context_) throw HostError(file_ + ": TensorRT could not create an execution context (GPU memory?)");
    first_input_ = engine_->getIOTensorName(0);
  }

  // The first profile whose batch range holds `rows`, selected on `stream`.
  void select(int64_t rows, cudaStream_t stream) {
    for (int32_t p = 0; p < engine_->getNbOptimizationProfiles(); ++p) {
      const auto lo = engine_->getProfileShape(first_input_.c_str(), p, nvinfer1::OptProfileSelector::kMIN);
      const auto hi = engine_->getProfileShape(first_input_.c_str(), p, nvinfer1::OptProfileSelector::kMAX);
      if (lo.d[0] <= rows && rows <= hi.d[0]) {
        if (p != profile_ && !context_->setOptimizationProfileAsync(p, stream))
          throw HostError(file_ + ": cannot select optimisation profile " + std::to_string(p));
        profile_ = p;
        return;
      }
    }
    throw std::invalid_argument(file_ + ": " + std::to_string(rows) +
                                " rows is outside every optimisation profile; rebuild with a larger --max-batch");
  }

  void bind(const std::string& name, const at::Tensor& t) {
    if (engine_->getTensorIOMode(name.c_str()) == nvinfer1::TensorIOMode::kINPUT &&
        !context_->setInputShape(name.c_str(), dims_of(t)))
      throw std::invalid_argument(file_ + ": input " + name + " has a shape outside the engine's profile");
    if (!context_->setTensorAddress(name.c_str(), t.data_ptr()))
      throw HostError(file_ + ": cannot bind " + name + "; " + kFix);
  }

  void run(cudaStream_t stream) {
    if (!context_->enqueueV3(stream)) throw HostError(file_ + ": TensorRT execution failed (see its log above)");
    check_cuda(cudaStreamSynchronize(stream), file_);
  }

  // Largest batch of the last profile (the decoder caps images per call).
  int64_t max_rows() const {
    const int32_t last = engine_->getNbOptimizationProfiles() - 1;
    return engine_->getProfileShape(first_input_.c_str(), last, nvinfer1::OptProfileSelector::kMAX).d[0];
  }

  bool aliased(const std::string& output) const { return engine_->getAliasedInputTensor(output.c_str()) != nullptr; }

 private:
  std::string file_, first_input_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  int32_t profile_ = -1;
};

class TrtCache : public KvCache {
 public:
  std::array<std::vector<at::Tensor>, 2> sets;  // each 2 x n_layer [B, H, C, D]; set 1 unused when aliased
  int cur = 0;
  int64_t rows = 0;
  at::Tensor token, position, logits;            // [B], [1], [B, V] on the GPU
};

class TensorRTExecutor : public StepExecutor {
 public:
  TensorRTExecutor(const Manifest& m, const c10::Device& device) : info_(m.info) {
    traits_.name = "tensorrt";
    traits_.device = device;
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) throw HostError("TensorRT runtime could not be created");
    check_cuda(cudaSetDevice(device.index()), "cannot select the CUDA device");
    check_cuda(cudaStreamCreate(&stream_), "cannot create a CUDA stream");
    decoder_ = std::make_unique<Engine>(*runtime_, m, "decoder");
    prefill_ = std::make_unique<Engine>(*runtime_, m, "prefill");
    step_ = std::make_unique<Engine>(*runtime_, m, "decode_step");
    const GraphEntry& g = m.graph("decode_step");
    past_.assign(g.inputs.begin() + 2, g.inputs.end());
    present_.assign(g.outputs.begin() + 1, g.outputs.end());
    aliased_ = !present_.empty() && step_->aliased(present_.front());
    prefill_outputs_ = m.graph("prefill").outputs;
  }
  ~TensorRTExecutor() override { cudaStreamDestroy(stream_); }

  const ExecutorTraits& traits() const override { return traits_; }

  Prefilled prefill(const at::Tensor& class_ids) override {
    auto cache = std::make_unique<TrtCache>();
    const int64_t rows = class_ids.size(0);
    const auto opts = at::TensorOptions().device(traits_.device);
    const auto kv = opts.dtype(dtype_of(info_.precision));
    for (int s = 0; s < (aliased_ ? 1 : 2); ++s)
      for (size_t i = 0; i < past_.size(); ++i)
        cache->sets[s].push_back(at::empty({rows, info_.n_head, info_.cache_len, info_.head_dim}, kv));
    cache->rows = rows;
    cache->token = at::empty({rows}, opts.dtype(at::kLong));
    cache->position = at::empty({1}, opts.dtype(at::kLong));
    cache->logits = at::empty({rows, info_.vocab_size}, kv);
    const at::Tensor ids = class_ids.to(traits_.device, at::kLong).contiguous();  // [B]
    prefill_->select(rows, stream_);
    prefill_->bind("class_ids", ids);
    prefill_->bind(prefill_outputs_.at(0), cache->logits);
    for (size_t i = 0; i < cache->sets[0].size(); ++i) prefill_->bind(prefill_outputs_.at(i + 1), cache->sets[0][i]);
    prefill_->run(stream_);
    at::Tensor logits = cache->logits;
    return {logits, std::move(cache)};
  }

  at::Tensor decode_step(const at::Tensor& tokens, int64_t pos, KvCache& kv) override {
    auto& c = dynamic_cast<TrtCache&>(kv);
    if (tokens.dim() != 1 || tokens.size(0) != c.rows)
      throw std::invalid_argument("tensorrt.decode_step expects [" + std::to_string(c.rows) + "] tokens");
    c.token.copy_(tokens.to(traits_.device, at::kLong));
    c.position.fill_(pos);
    const int dst = aliased_ ? c.cur : 1 - c.cur;
    step_->select(c.rows, stream_);
    step_->bind("token", c.token);
    step_->bind("position", c.position);
    for (size_t i = 0; i < past_.size(); ++i) {
      step_->bind(past_[i], c.sets[c.cur][i]);
      step_->bind(present_[i], c.sets[dst][i]);
    }
    step_->bind("logits", c.logits);
    step_->run(stream_);
    c.cur = dst;
    return c.logits;  // [B, V]
  }

  at::Tensor decode_image(const at::Tensor& holistic, const at::Tensor& patch) override {
    const int64_t n = holistic.size(0), limit = decoder_->max_rows();
    at::Tensor image = at::empty({n, 3, info_.image_size, info_.image_size},
                                 at::TensorOptions().device(traits_.device).dtype(at::kFloat));  // [n, 3, H, W]
    for (int64_t i = 0; i < n; i += limit) {  // the decoder's profile caps images per call
      const int64_t m = std::min(limit, n - i);
      const at::Tensor h = holistic.narrow(0, i, m).to(traits_.device, at::kLong).contiguous();  // [m, Nh]
      const at::Tensor p = patch.narrow(0, i, m).to(traits_.device, at::kLong).contiguous();     // [m, Np]
      at::Tensor out = image.narrow(0, i, m);  // contiguous: a leading-dimension slice
      decoder_->select(m, stream_);
      decoder_->bind("holistic_ids", h);
      decoder_->bind("patch_ids", p);
      decoder_->bind("image", out);
      decoder_->run(stream_);
    }
    return image;
  }

 private:
  ModelInfo info_;
  ExecutorTraits traits_;
  TrtLogger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<Engine> decoder_, prefill_, step_;
  std::vector<std::string> past_, present_, prefill_outputs_;
  bool aliased_ = false;
};

}  // namespace

std::unique_ptr<StepExecutor> make_tensorrt_executor(const Manifest& manifest, const c10::Device& device) {
  if (!device.is_cuda()) throw HostError("the tensorrt backend runs on a CUDA GPU; pass --device cuda");
  check_manifest(manifest, std::max<int>(device.index(), 0));
  return std::make_unique<TensorRTExecutor>(manifest, c10::Device(c10::kCUDA, std::max<c10::DeviceIndex>(device.index(), 0)));
}

}  // namespace hita::detail
