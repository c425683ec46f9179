// The backends compiled into this host, keyed by the manifest's "engine" field. A new backend
// (e.g. TensorRT) is its own source file plus one line in kBackends.
#include "executor.h"

namespace hita::detail {
namespace {

struct Backend {
  const char* engine;
  ExecutorFactory make;
};

constexpr Backend kBackends[] = {
    {"aoti", make_aoti_executor},
#ifdef HITA_WITH_TENSORRT
    {"tensorrt", make_tensorrt_executor},
#endif
};

}  // namespace

std::vector<std::string> backend_engines() {
  std::vector<std::string> out;
  for (const Backend& b : kBackends) out.emplace_back(b.engine);
  return out;
}

ExecutorFactory backend_for(const std::string& engine) {
  for (const Backend& b : kBackends)
    if (engine == b.engine) return b.make;
  // open_artifacts refuses such a folder first; this guards callers that skip it.
  throw HostError("no backend for engine '" + engine + "' is compiled into this host");
}

}  // namespace hita::detail
