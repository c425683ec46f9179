#include "manifest.h"

#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <set>

namespace hita::detail {
namespace {

using nlohmann::json;

// A field of the wrong type or value; becomes "manifest.json: invalid content (...)".
struct Invalid : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string py_str(const std::string& s) { return "'" + s + "'"; }

std::string py_list(const std::vector<std::string>& items) {  // Python's repr of a list of str
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + py_str(items[i]);
  return out + "]";
}

const json& member(const json& obj, const std::string& key, const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end()) throw Invalid(where + key + " is missing");
  return *it;
}

std::string str_field(const json& obj, const std::string& key, const std::string& where) {
  const json& v = member(obj, key, where);
  if (!v.is_string()) throw Invalid(where + key + " must be a JSON str");
  return v.get<std::string>();
}

int64_t int_field(const json& obj, const std::string& key, const std::string& where, int64_t min) {
  const json& v = member(obj, key, where);
  if (!v.is_number_integer() || v.get<int64_t>() < min)
    throw Invalid(where + key + " must be an integer >= " + std::to_string(min));
  return v.get<int64_t>();
}

// Flat folders only: a name is one visible path component, never the manifest or its checksum,
// so no entry can reach outside the folder ("../x", "/etc/passwd") or shadow the manifest.
void check_file_name(const std::string& name) {
  const bool plain = !name.empty() && name != kManifestName && name != kChecksumName && name[0] != '.' &&
                     name.find_first_of(std::string("/\\\0", 3)) == std::string::npos;
  if (!plain)
    throw Invalid("artifact file name " + py_str(name) + " must be a plain, visible file name other than " +
                  kManifestName);
}

// inputs/outputs: [{"name": ..., "dtype": ..., "shape": [...]}, ...]; mutates: ["name", ...].
std::vector<std::string> tensor_names(const json& list, const std::string& where, bool objects) {
  if (!list.is_array()) throw Invalid(where + " must be a JSON list");
  std::vector<std::string> names;
  for (const json& t : list) {
    if (objects && t.is_object()) names.push_back(str_field(t, "name", where + " entry "));
    else if (!objects && t.is_string()) names.push_back(t.get<std::string>());
    else throw Invalid(where + (objects ? " entries must be tensor objects" : " entries must be tensor names"));
  }
  return names;
}

GraphEntry parse_graph(const std::string& name, const json& g) {
  const std::string where = "graph '" + name + "' ";
  if (!g.is_object()) throw Invalid("graph " + py_str(name) + " must be an object with a 'file' name");
  GraphEntry e;
  e.file = str_field(g, "file", where);
  check_file_name(e.file);
  e.inputs = tensor_names(member(g, "inputs", where), where + "inputs", true);
  e.outputs = tensor_names(member(g, "outputs", where), where + "outputs", true);
  if (g.contains("mutates")) e.mutates = tensor_names(g["mutates"], where + "mutates", false);
  return e;
}

void check_keys(const json& m, const std::string& mpath) {
  static const std::set<std::string> required = {"engine", "tokenizer_preset", "tokenizer_config", "gpt_preset",
                                                 "gpt_config", "pos128", "precision", "device", "versions", "graphs"};
  static const std::set<std::string> optional = {"files", "checkpoints", "options", "created", "format_version"};
  std::vector<std::string> unknown, missing;
  for (const auto& kv : m.items())
    if (!required.count(kv.key()) && !optional.count(kv.key())) unknown.push_back(kv.key());
  for (const auto& k : required)
    if (!m.contains(k)) missing.push_back(k);
  if (!unknown.empty() || !missing.empty())
    throw HostError(mpath + ": unknown keys " + py_list(unknown) + ", missing keys " + py_list(missing) +
                    "; the folder was not written by this hita version; re-run `hita export`");
}

// The JSON object -> Manifest, every field type checked (Python: Manifest.from_dict).
Manifest parse_fields(const json& m, const std::string& root) {
  Manifest out;
  out.root = root;
  ModelInfo& info = out.info;
  for (const char* key : {"tokenizer_config", "gpt_config", "versions", "graphs", "files", "checkpoints", "options"})
    if (m.contains(key) && !m[key].is_object()) throw Invalid(std::string(key) + " must be a JSON object");
  if (m.contains("created") && !m["created"].is_string()) throw Invalid("created must be a JSON str");
  info.engine = str_field(m, "engine", "");
  info.gpt_preset = str_field(m, "gpt_preset", "");
  info.tokenizer_preset = str_field(m, "tokenizer_preset", "");
  info.device = str_field(m, "device", "");
  info.precision = str_field(m, "precision", "");
  info.pos128 = str_field(m, "pos128", "");
  // The pos128 rule is baked into the decode graph; the host only reports it, but a value this
  // hita does not know means a folder from another version.
  if (info.pos128 != "reference" && info.pos128 != "consistent")
    throw Invalid("pos128 must be 'reference' or 'consistent', got " + py_str(info.pos128));
  if (info.precision != "float32" && info.precision != "bfloat16" && info.precision != "float16")
    throw Invalid("precision must be float32, bfloat16 or float16, got " + py_str(info.precision));
  const json& versions = m["versions"];
  info.torch_version = versions.contains("torch") ? str_field(versions, "torch", "versions.") : "unknown";

  const json& gpt = m["gpt_config"];
  info.num_classes = int_field(gpt, "num_classes", "gpt_config: ", 1);
  info.vocab_size = int_field(gpt, "vocab_size", "gpt_config: ", 2);
  info.n_holistic = int_field(gpt, "n_holistic", "gpt_config: ", 1);
  const int64_t grid = int_field(gpt, "grid", "gpt_config: ", 1);
  info.n_patch = grid * grid;
  info.n_layer = int_field(gpt, "n_layer", "gpt_config: ", 1);
  info.n_head = int_field(gpt, "n_head", "gpt_config: ", 1);
  info.head_dim = int_field(gpt, "dim", "gpt_config: ", 1) / info.n_head;
  info.cache_len = (info.seq_len() + 1 + 7) / 8 * 8;  // GPTConfig.cache_len: class token + sequence, to 8
  info.image_size = int_field(m["tokenizer_config"], "image_size", "tokenizer_config: ", 1);

  for (const auto& g : m["graphs"].items()) out.graphs[g.key()] = parse_graph(g.key(), g.value());
  if (m.contains("files")) {
    for (const auto& f : m["files"].items()) {
      check_file_name(f.key());
      const json& e = f.value();
      const bool ok = e.is_object() && e.contains("sha256") && e["sha256"].is_string() &&
                      e["sha256"].get<std::string>().size() == 64 && e.contains("size") &&
                      e["size"].is_number_integer() && e["size"].get<int64_t>() >= 0;
      if (!ok) throw Invalid("files[" + py_str(f.key()) + "] must be {'sha256': 64 hex digits, 'size': bytes}");
      out.files[f.key()] = {e["sha256"].get<std::string>(), e["size"].get<int64_t>()};
    }
  }
  out.options_json = m.contains("options") ? m["options"].dump() : "{}";
  out.versions_json = versions.dump();
  return out;
}

// manifest.json and manifest.sha256 of one opened folder -> Manifest (Python: _read_manifest).
Manifest read_manifest(const Folder& folder, const std::optional<std::string>& pin, const std::string& fix) {
  const std::string mpath = folder.path() + "/" + kManifestName, cpath = folder.path() + "/" + kChecksumName;
  const std::optional<std::string> data = folder.read(kManifestName);
  if (!data) throw HostError(mpath + ": missing (not a hita artifacts folder, or the export did not finish); " + fix);
  const std::optional<std::string> sum = folder.read(kChecksumName);
  if (!sum) throw HostError(cpath + ": missing (written by an older hita, or the export did not finish); " + fix);
  // sha256sum format: "<64 hex>  manifest.json"; the first word is the digest.
  const size_t start = sum->find_first_not_of(" \t\r\n");
  if (start == std::string::npos) throw HostError(cpath + ": unreadable (empty); " + fix);
  const std::string recorded = sum->substr(start, sum->find_first_of(" \t\r\n", start) - start);
  const std::string digest = sha256_hex(*data);
  if (recorded != digest) throw HostError(mpath + ": content changed after export (checksum mismatch); " + fix);
  if (pin) {
    std::string want = *pin;
    want.erase(0, want.find_first_not_of(" \t\r\n"));
    want.erase(want.find_last_not_of(" \t\r\n") + 1);
    std::transform(want.begin(), want.end(), want.begin(), [](unsigned char c) { return std::tolower(c); });
    if (digest != want)
      throw HostError(mpath + ": manifest sha256 " + digest + " does not match the pinned " + want +
                      "; this is not the export you reviewed");
  }
  json m;
  try {
    m = json::parse(*data);
  } catch (const json::exception& e) {
    throw HostError(mpath + ": unreadable (" + e.what() + "); " + fix);
  }
  if (!m.is_object()) throw HostError(mpath + ": not a JSON object; " + fix);
  const auto version = m.find("format_version");
  if (version == m.end() || !version->is_number_integer() || version->get<int64_t>() != kFormatVersion)
    throw HostError(mpath + ": format version " + (version == m.end() ? "None" : version->dump()) +
                    ", this hita reads version " + std::to_string(kFormatVersion) + "; re-export with this hita (" +
                    fix + ")");
  check_keys(m, mpath);
  try {
    Manifest out = parse_fields(m, folder.path());
    out.info.manifest_sha256 = digest;
    return out;
  } catch (const Invalid& e) {
    throw HostError(mpath + ": invalid content (" + e.what() + "); re-run `hita export`");
  } catch (const json::exception& e) {  // a value out of int64 range and the like
    throw HostError(mpath + ": invalid content (" + e.what() + "); re-run `hita export`");
  }
}

// Python: _require_pin.
void require_pin(const Manifest& m, const std::optional<std::string>& pin) {
  const char* env = std::getenv(kPinEnv);
  const bool required = env && std::string(env) != "" && std::string(env) != "0";
  const auto& code = code_engines();
  if (required && !pin && std::find(code.begin(), code.end(), m.info.engine) != code.end())
    throw HostError(m.root + ": a " + m.info.engine + " folder contains executable code and " + kPinEnv +
                    " is set; pass --expect-manifest-sha256 HEX (the sha256 of the reviewed export's manifest.json)");
}

VerifiedFolder verify(const Folder& folder, const std::optional<std::string>& pin,
                      const std::vector<std::string>& engines) {
  const std::string any = engines.size() == 1 ? engines[0] : "<engine>";
  VerifiedFolder out{read_manifest(folder, pin, "re-run `hita export --engine " + any + "`"), {}};
  const Manifest& m = out.manifest;
  const std::string& root = m.root;
  const std::string fix = "re-run `hita export --engine " + m.info.engine + "`";
  if (std::find(engines.begin(), engines.end(), m.info.engine) == engines.end()) {
    std::string names;
    for (const auto& e : engines) names += (names.empty() ? "" : ", ") + e;
    throw HostError(root + ": holds a " + py_str(m.info.engine) + " export, which this host cannot run (it runs " +
                    names + "); point to an " + any + " artifacts folder or run `hita export --engine " + any + "`");
  }
  require_pin(m, pin);
  for (const auto& [name, g] : m.graphs)
    if (!m.files.count(g.file))
      throw HostError(root + "/" + kManifestName + ": graph " + py_str(name) + " names " + py_str(g.file) +
                      ", which is not listed; " + fix);
  for (const auto& [name, entry] : m.files) {
    const std::optional<struct stat> st = folder.stat(name);
    if (!st || !S_ISREG(st->st_mode))
      throw HostError(name + ": missing from " + root + " (or not a plain file); " + fix);
    out.fingerprints[name] = fingerprint_of(*st);
    if (st->st_size != entry.size)
      throw HostError(name + ": " + std::to_string(st->st_size) + " bytes, manifest says " +
                      std::to_string(entry.size) + " (truncated or replaced after export); " + fix);
    if (folder.sha256(name) != entry.sha256)
      throw HostError(name + ": sha256 mismatch (file changed after export); " + fix);
  }
  return out;
}

}  // namespace

const std::vector<std::string>& code_engines() {
  static const std::vector<std::string> engines = {"aoti", "tensorrt"};
  return engines;
}

const GraphEntry& Manifest::graph(const std::string& name) const {
  auto it = graphs.find(name);
  if (it != graphs.end()) return it->second;
  std::string have;
  for (const auto& g : graphs) have += (have.empty() ? "" : ", ") + g.first;
  throw HostError(std::string(kManifestName) + ": no graph " + py_str(name) + " (has " +
                  (have.empty() ? "none" : have) + "); re-run `hita export --engine " + info.engine + "`");
}

VerifiedFolder open_artifacts(const std::string& dir, const std::optional<std::string>& expect_sha256,
                              const std::vector<std::string>& engines) {
  for (int attempt = 0;; ++attempt) {
    Folder folder(dir);
    try {
      return verify(folder, expect_sha256, engines);
    } catch (const HostError&) {
      // A concurrent export replaced the folder while it was read: read the new one.
      if (attempt == 2 || !folder.replaced()) throw;
    }
  }
}

void check_unchanged(const std::string& root, const std::map<std::string, Fingerprint>& fingerprints) {
  for (const auto& [name, fp] : fingerprints) {
    struct stat st {};
    if (::stat((root + "/" + name).c_str(), &st) != 0 || !(fingerprint_of(st) == fp))
      throw HostError(name + ": changed while it was being loaded (replaced by another process?); "
                      "load the folder again");
  }
}

std::string public_version(const std::string& version) { return version.substr(0, version.find('+')); }

}  // namespace hita::detail
