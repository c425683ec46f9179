// Opening and verifying an artifacts folder: the C++ side of export/manifest.py load_manifest
// (format 2). Engine-neutral and torch-free; a backend adds its own checks on the Manifest.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "folder.h"
#include "hita/host.h"

namespace hita::detail {

constexpr int64_t kFormatVersion = 2;
constexpr const char* kManifestName = "manifest.json";
constexpr const char* kChecksumName = "manifest.sha256";
constexpr const char* kPinEnv = "HITA_REQUIRE_PINNED";
// Engine kinds whose files are executable code when loaded (shared libraries, plugins).
const std::vector<std::string>& code_engines();

struct GraphEntry {
  std::string file;
  std::vector<std::string> inputs, outputs;        // tensor names, in call order
  std::optional<std::vector<std::string>> mutates;  // inputs written in place, when declared
};

struct FileEntry {
  std::string sha256;
  int64_t size = 0;
};

struct Manifest {
  std::string root;  // the folder as given (messages, package paths)
  ModelInfo info;    // engine, manifest sha256, presets, device, versions, model sizes
  std::map<std::string, GraphEntry> graphs;
  std::map<std::string, FileEntry> files;
  std::string options_json;   // engine-specific facts (exporter, TensorRT profiles, ...) as JSON text
  std::string versions_json;  // tool versions ({"torch": ..., "tensorrt": ..., "compute_capability": ...})

  std::string path(const std::string& file) const { return root + "/" + file; }
  // The entry of a graph; HostError naming the graphs present when it is absent.
  const GraphEntry& graph(const std::string& name) const;
};

// What open_artifacts proved, plus what must still hold once a backend has loaded the files.
struct VerifiedFolder {
  Manifest manifest;
  std::map<std::string, Fingerprint> fingerprints;  // per file, taken before it was hashed
};

// Checks, in load_manifest's order: the folder, manifest.json and manifest.sha256 exist; the
// manifest's bytes hash to the recorded checksum (and to `expect_sha256` when pinned); it parses,
// has format version 2 and well-typed fields; its engine is one of `engines` (those compiled into
// this host); the HITA_REQUIRE_PINNED policy; every listed file is a plain file with the recorded
// size and sha256. All reads go through one directory handle; a folder replaced by a concurrent
// export meanwhile is read again (up to 3 times). Throws HostError: one line, cause and fix.
VerifiedFolder open_artifacts(const std::string& dir, const std::optional<std::string>& expect_sha256,
                              const std::vector<std::string>& engines);

// Refuses files that changed since open_artifacts hashed them (call after loading them).
void check_unchanged(const std::string& root, const std::map<std::string, Fingerprint>& fingerprints);

// "2.13.0+cpu" -> "2.13.0".
std::string public_version(const std::string& version);

}  // namespace hita::detail
