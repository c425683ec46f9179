#include "manifest.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "json.h"
#include "util.h"

namespace fs = std::filesystem;

namespace hita::detail {
namespace {

constexpr int64_t kFormatVersion = 1;
constexpr const char* kManifest = "manifest.json";
constexpr const char* kChecksumKey = "manifest_sha256";
constexpr const char* kFix = "re-run `hita export --engine aoti`";

std::string read_text(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) throw HostError(p.string() + ": cannot be read; " + kFix);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Shape entry of a signature: an int size or a symbolic axis name (-1 here).
int64_t dim_at(const Json& tensor, size_t i) {
  const Json& shape = tensor.at("shape", "signature");
  if (!shape.is_array() || i >= shape.items.size()) throw std::runtime_error("signature: short shape");
  return shape.items[i].is_number() ? shape.items[i].as_int("shape") : -1;
}

const Json& graph_entry(const Json& graphs, const std::string& name) {
  const Json* g = graphs.find(name);
  if (!g || !g->is_object())
    throw HostError(std::string(kManifest) + ": no graph '" + name + "'; " + kFix);
  return *g;
}

}  // namespace

std::string public_version(const std::string& version) { return version.substr(0, version.find('+')); }

Artifacts verify_artifacts(const std::string& dir, const std::string& device_kind,
                           const std::string& torch_version) {
  const fs::path root(dir);
  if (!fs::is_directory(root)) throw HostError(dir + ": no such artifacts folder; create it with `hita export --engine aoti`");
  const fs::path mpath = root / kManifest;
  if (!fs::is_regular_file(mpath))
    throw HostError(mpath.string() + ": missing (not a hita artifacts folder, or the export did not finish); " + kFix);
  Json m;
  try {
    m = parse_json(read_text(mpath));
  } catch (const HostError&) {
    throw;
  } catch (const std::exception& e) {
    throw HostError(mpath.string() + ": unreadable (" + e.what() + "); " + kFix);
  }
  if (!m.is_object()) throw HostError(mpath.string() + ": not a JSON object; " + kFix);

  Artifacts out;
  try {
    const Json* version = m.find("format_version");
    if (!version || !version->is_number() || version->number != static_cast<double>(kFormatVersion))
      throw HostError(mpath.string() + ": format version " + (version ? version->canonical() : "None") +
                      ", this host reads version " + std::to_string(kFormatVersion) + "; " + kFix);
    // Content checksum: sha256 of json.dumps(body without the checksum, sort_keys, compact).
    Json body = m;
    body.members.erase(std::remove_if(body.members.begin(), body.members.end(),
                                      [](const auto& kv) { return kv.first == kChecksumKey; }),
                       body.members.end());
    const Json* sum = m.find(kChecksumKey);
    if (!sum || !sum->is_string() || sum->str != sha256_hex(body.canonical()))
      throw HostError(mpath.string() + ": content changed after export (checksum mismatch); " + kFix);

    const std::string& engine = m.at("engine", kManifest).as_string("engine");
    if (engine != "aoti")
      throw HostError(dir + ": holds a '" + engine + "' export, expected 'aoti'; point to an aoti artifacts "
                      "folder or run `hita export --engine aoti`");

    // Files: every graph's file is listed; every listed file exists with its size and sha256.
    const Json& files = m.at("files", kManifest);
    const Json& graphs = m.at("graphs", kManifest);
    for (const auto& g : graphs.members) {
      const std::string& file = g.second.at("file", "graph " + g.first).as_string("file");
      if (!files.find(file))
        throw HostError(mpath.string() + ": graph '" + g.first + "' names '" + file + "', which is not listed; " + kFix);
    }
    for (const auto& f : files.members) {
      const fs::path p = root / f.first;
      if (f.first.find('/') != std::string::npos || f.first.empty() || f.first[0] == '.')
        throw HostError(mpath.string() + ": file name '" + f.first + "' is not a plain file name; " + kFix);
      if (!fs::is_regular_file(p)) throw HostError(f.first + ": missing from " + dir + "; " + kFix);
      const auto size = static_cast<int64_t>(fs::file_size(p));
      const int64_t want = f.second.at("size", f.first).as_int("size");
      if (size != want)
        throw HostError(f.first + ": " + std::to_string(size) + " bytes, manifest says " + std::to_string(want) +
                        " (truncated or replaced after export); " + kFix);
      if (sha256_file(p.string()) != f.second.at("sha256", f.first).as_string("sha256"))
        throw HostError(f.first + ": sha256 mismatch (file changed after export); " + kFix);
    }

    // Device kind and torch version: compiled C++ runs only where and with what it was built for.
    const std::string& built_for = m.at("device", kManifest).as_string("device");
    if (built_for != device_kind)
      throw HostError(dir + ": packages were compiled for device '" + built_for + "' and cannot run on '" +
                      device_kind + "'; export for this device with `hita export --engine aoti --device " +
                      device_kind + "` or run with --device " + built_for);
    const std::string& built_with = m.at("versions", kManifest).at("torch", "versions").as_string("torch");
    if (public_version(built_with) != public_version(torch_version))
      throw HostError(dir + ": packages were compiled with torch " + built_with + " but this host uses libtorch " +
                      torch_version + "; AOTInductor packages load only in the torch version that built them; "
                      "re-export with this torch or rebuild the host against torch " + public_version(built_with));

    // Model facts.
    ModelInfo& info = out.info;
    const Json& gpt = m.at("gpt_config", kManifest);
    const Json& tok = m.at("tokenizer_config", kManifest);
    info.gpt_preset = m.at("gpt_preset", kManifest).as_string("gpt_preset");
    info.tokenizer_preset = m.at("tokenizer_preset", kManifest).as_string("tokenizer_preset");
    info.device = built_for;
    info.torch_version = built_with;
    info.precision = m.at("precision", kManifest).as_string("precision");
    info.pos128 = m.at("pos128", kManifest).as_string("pos128");
    info.num_classes = gpt.at("num_classes", "gpt_config").as_int("num_classes");
    info.vocab_size = gpt.at("vocab_size", "gpt_config").as_int("vocab_size");
    info.n_holistic = gpt.at("n_holistic", "gpt_config").as_int("n_holistic");
    const int64_t grid = gpt.at("grid", "gpt_config").as_int("grid");
    info.n_patch = grid * grid;
    info.n_layer = gpt.at("n_layer", "gpt_config").as_int("n_layer");
    info.image_size = tok.at("image_size", "tokenizer_config").as_int("image_size");
    if (info.precision != "float32" && info.precision != "bfloat16" && info.precision != "float16")
      throw HostError(mpath.string() + ": unsupported precision '" + info.precision + "'; " + kFix);

    const Json& step = graph_entry(graphs, "decode_step");
    const Json& inputs = step.at("inputs", "decode_step");
    if (!inputs.is_array() || inputs.items.size() != static_cast<size_t>(2 + 2 * info.n_layer))
      throw HostError("decode_step: signature does not have token, position and 2 x n_layer caches; " + std::string(kFix));
    info.n_head = dim_at(inputs.items[2], 1);
    info.cache_len = dim_at(inputs.items[2], 2);
    info.head_dim = dim_at(inputs.items[2], 3);
    const Json* mutates = step.find("mutates");
    if (!mutates || !mutates->is_array() || mutates->items.size() != static_cast<size_t>(2 * info.n_layer))
      throw HostError("decode_step: the manifest does not declare the in-place KV cache this host drives; " +
                      std::string(kFix) + " with this hita");
    const Json& outputs = step.at("outputs", "decode_step");
    if (!outputs.is_array() || outputs.items.size() != 1)
      throw HostError("decode_step: expected a single 'logits' output (in-place cache); " + std::string(kFix));

    out.decoder = (root / graph_entry(graphs, "decoder").at("file", "decoder").as_string("file")).string();
    out.prefill = (root / graph_entry(graphs, "prefill").at("file", "prefill").as_string("file")).string();
    out.decode_step = (root / step.at("file", "decode_step").as_string("file")).string();
  } catch (const HostError&) {
    throw;
  } catch (const std::exception& e) {
    throw HostError(mpath.string() + ": invalid content (" + e.what() + "); " + kFix);
  }
  return out;
}

}  // namespace hita::detail
