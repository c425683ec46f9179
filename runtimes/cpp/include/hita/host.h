// hita C++ host: runs an artifacts folder (`hita export --engine aoti`) end to end: prefill, every
// decode step, classifier-free guidance, sampling, and decoding tokens to pixels.
//
// The header is plain C++17 and includes no torch header, so a service can embed the host with
// its own compiler settings; it links against libhita_host and the libtorch of the torch wheel
// that exported the packages.
//
// Sampling mirrors runtimes/sampling.py and runtimes/loop.py operation by operation (same ATen
// kernels for CFG, temperature, top-k, top-p, float32 softmax and float64 cumulative sum, and the
// same counter-based noise), so for the same artifacts, class ids and options the host draws the
// same tokens as `hita generate --runtime aoti`.
//
// Trust: an AOTInductor folder is compiled code that runs inside this process. The manifest checks
// prove a folder is intact, not who wrote it; pin the export you reviewed (expect_manifest_sha256),
// and set HITA_REQUIRE_PINNED=1 to refuse unpinned code-bearing folders.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace hita {

// A refusal or bad input: one line that names the cause and the fix (exit code 2 in hita-host).
class HostError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Same fields, defaults and validation rules as runtimes/sampling.py SamplingOptions.
struct SamplingOptions {
  double cfg_scale = 1.5;     // 1 = no guidance; > 1 = guidance with [cond ; null-class] rows
  int64_t cfg_interval = -1;  // -1 = guidance on every step; k >= 0 = only decode steps <= k
  double temperature = 1.0;   // 0 = greedy (argmax)
  int64_t top_k = 0;          // 0 = off
  double top_p = 1.0;         // 1 = off
  uint64_t seed = 0;          // key of the noise stream
  uint64_t row_offset = 0;    // global index of the first image (noise row), as in generate_tokens

  // Throws HostError with the same wording rules as the Python validation.
  void validate() const;
  bool use_cfg() const { return cfg_scale > 1.0; }
  // Whether decode step `step` (= pos - 1; -1 = prefill) mixes CFG logits.
  bool cfg_active(int64_t step) const;
};

// One RGB image, rows top to bottom, 3 bytes per pixel.
struct Image {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> rgb;
};

struct Generation {
  std::vector<int64_t> class_ids;
  std::vector<std::vector<int64_t>> tokens;  // [n][n_holistic + n_patch], holistic first
  std::vector<Image> images;                 // empty when decoding was not requested
  double prefill_ms = 0;                     // prefill + first draw (summed over chunks)
  std::vector<double> step_ms;               // one entry per decode step (forward + draw)
  std::vector<double> forward_ms;            // the executor call alone (+ logits to the CPU), per step
  double decode_image_ms = 0;
  double total_ms = 0;
};

// Facts read from manifest.json.
struct ModelInfo {
  std::string engine, manifest_sha256;  // the engine kind and the sha256 of manifest.json's bytes
  std::string gpt_preset, tokenizer_preset, device, torch_version, precision, pos128;
  int64_t num_classes = 0, vocab_size = 0, n_holistic = 0, n_patch = 0;
  int64_t n_layer = 0, n_head = 0, cache_len = 0, head_dim = 0, image_size = 0;
  int64_t seq_len() const { return n_holistic + n_patch; }
  int64_t null_class() const { return num_classes; }  // class-table row of the CFG null rows
};

class Host {
 public:
  // Opens and verifies an artifacts folder as Python's load_manifest does: manifest.json's bytes
  // against manifest.sha256 (and the pin), format version, field types, an engine this host runs,
  // the HITA_REQUIRE_PINNED policy, every file's size and sha256; then the backend's own checks
  // (AOTI: device kind and torch version the packages were compiled with) and loading.
  // device: "cpu" or "cuda[:i]". Throws HostError on any mismatch.
  explicit Host(const std::string& artifacts_dir, const std::string& device = "cpu",
                const std::optional<std::string>& expect_manifest_sha256 = std::nullopt);
  ~Host();
  Host(const Host&) = delete;
  Host& operator=(const Host&) = delete;

  const ModelInfo& info() const;

  // Generates one image per class id (ids in [0, num_classes)). With decode_images=false only
  // the tokens (and timings) are produced.
  Generation generate(const std::vector<int64_t>& class_ids, const SamplingOptions& options,
                      bool decode_images = true);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The counter-based noise of runtimes/sampling.py NoiseStream, bit for bit.
uint64_t mix64(uint64_t z);
uint64_t noise_bits(uint64_t seed, uint64_t step, uint64_t row);
double noise_uniform(uint64_t seed, uint64_t step, uint64_t row);  // (bits >> 11) * 2^-53

// Writes an 8-bit RGB PNG. Throws HostError when the file cannot be written.
void write_png(const std::string& path, const Image& image);

// The torch version this host was compiled against ("2.13.0").
std::string torch_version();

// Intra-op CPU threads of libtorch and of the packages' OpenMP kernels (at::set_num_threads).
void set_num_threads(int threads);

}  // namespace hita
