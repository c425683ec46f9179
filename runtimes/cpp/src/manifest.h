// Opening and verifying an AOTI artifacts folder (mirrors export/manifest.py load_manifest and
// the device / torch-version checks of runtimes/aoti.py). No torch dependency.
#pragma once

#include <string>
#include <vector>

#include "hita/host.h"

namespace hita::detail {

struct Artifacts {
  ModelInfo info;
  std::string decoder, prefill, decode_step;  // package paths
};

// Throws HostError (one line: cause and fix) unless `dir` is an intact "aoti" artifacts folder
// compiled for `device_kind` ("cpu"/"cuda") with torch `torch_version` (local suffix ignored).
Artifacts verify_artifacts(const std::string& dir, const std::string& device_kind,
                           const std::string& torch_version);

// "2.13.0+cpu" -> "2.13.0".
std::string public_version(const std::string& version);

}  // namespace hita::detail
