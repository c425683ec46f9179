// hita-host: generate class-conditional images from an artifacts folder, as PNG files.
//
//   hita-host --artifacts DIR --classes 1,2,5-7 [--out DIR] [--cfg-scale 1.5] [--cfg-interval -1]
//             [--temperature 1] [--top-k 0] [--top-p 1] [--seed 0] [--row-offset 0]
//             [--device cpu] [--threads N] [--expect-manifest-sha256 HEX] [--no-images] [--json]
//
// Exit status: 0 success; 2 refused input or artifacts (one line "error: ..." on stderr);
// 1 any other failure. --json prints one JSON object on stdout: class ids, tokens, timings, PNGs.
#include <CLI/CLI.hpp>
#include <charconv>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "hita/host.h"

namespace {

[[noreturn]] void bad(const std::string& msg) { throw hita::HostError(msg); }

// CLI11 reads integers with strtoll base 0 ("010" is octal) and wraps "-1" into an unsigned:
// accept plain decimal in T's range only, rewritten to its canonical form before conversion.
template <typename T>
CLI::Validator decimal() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        T v{};
        const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
        if (ec != std::errc() || end != s.data() + s.size())
          return "expects a decimal integer in range, got '" + s + "'";
        s = std::to_string(v);
        return "";
      },
      "");  // no extra label in --help: the option's type (INT, UINT) says it
}

// One decimal integer filling [s, e) exactly.
bool read_int(const char* s, const char* e, int64_t& v) {
  const auto r = std::from_chars(s, e, v);
  return r.ec == std::errc() && r.ptr == e;
}

std::vector<int64_t> parse_classes(const std::string& spec) {
  std::vector<int64_t> ids;
  std::stringstream ss(spec);
  std::string part;
  while (std::getline(ss, part, ',')) {
    if (part.empty()) continue;
    const size_t dash = part.find('-', 1);  // "-3" alone is a (refused) negative id, not a range
    const char *s = part.data(), *e = s + part.size(), *mid = dash == std::string::npos ? e : s + dash;
    int64_t a = 0, b = 0;
    const bool ok = read_int(s, mid, a) && (mid == e ? (b = a, true) : read_int(mid + 1, e, b));
    if (!ok || b - a > 1000000) bad("cannot read class list '" + spec + "'; use e.g. --classes 1,2,5-7");
    for (int64_t c = a; c <= b; ++c) ids.push_back(c);
  }
  if (ids.empty()) bad("no class ids given; pass --classes 1,2,3");
  return ids;
}

nlohmann::json report(const hita::Host& host, const hita::Generation& g, const std::string& device,
                      const std::vector<std::string>& pngs, double per_step) {
  return {{"class_ids", g.class_ids},
          {"tokens", g.tokens},
          {"prefill_ms", g.prefill_ms},
          {"step_ms", g.step_ms},
          {"forward_ms", g.forward_ms},
          {"mean_step_ms", per_step},
          {"decode_image_ms", g.decode_image_ms},
          {"seconds", g.total_ms / 1000.0},
          {"device", device},
          {"engine", host.info().engine},
          {"manifest_sha256", host.info().manifest_sha256},
          {"torch", hita::torch_version()},
          {"pngs", pngs}};
}

int run(int argc, char** argv) {
  std::string artifacts, classes, out_dir = "out/host", device = "cpu", pin;
  hita::SamplingOptions opts;
  bool no_images = false, json = false;
  int threads = 0;

  CLI::App app{"Generate class-conditional images from a hita artifacts folder (`hita export --engine aoti`).",
               "hita-host"};
  app.add_option("--artifacts", artifacts, "artifacts folder made by `hita export --engine aoti`");
  app.add_option("--classes", classes, "class ids or ranges, e.g. 1,2,5-7");
  app.add_option("--out", out_dir, "folder for the PNG files")->capture_default_str();
  app.add_option("--cfg-scale", opts.cfg_scale, "classifier-free guidance scale (1 = off)")->capture_default_str();
  app.add_option("--cfg-interval", opts.cfg_interval, "-1 = guide every step; k = stop after decode step k")
      ->check(decimal<int64_t>())->capture_default_str();
  app.add_option("--temperature", opts.temperature, "0 = greedy")->capture_default_str();
  app.add_option("--top-k", opts.top_k, "0 = off")->check(decimal<int64_t>())->capture_default_str();
  app.add_option("--top-p", opts.top_p, "1 = off")->capture_default_str();
  app.add_option("--seed", opts.seed, "key of the noise stream, in [0, 2^64)")
      ->check(decimal<uint64_t>())->capture_default_str();
  app.add_option("--row-offset", opts.row_offset, "global index of the first image (noise row)")
      ->check(decimal<uint64_t>())->capture_default_str();
  app.add_option("--device", device, "cpu or cuda[:i]")->capture_default_str();
  app.add_option("--threads", threads, "intra-op CPU threads (default: libtorch's)")->check(decimal<int>());
  app.add_option("--expect-manifest-sha256", pin, "refuse any manifest.json but the reviewed one (its sha256)");
  app.add_flag("--no-images", no_images, "tokens and timings only");
  app.add_flag("--json", json, "print one JSON report on stdout");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    bad(std::string(e.what()) + "; see hita-host --help");
  }
  if (artifacts.empty()) bad("pass --artifacts DIR (a folder made by `hita export --engine aoti`)");
  if (classes.empty()) bad("pass --classes, e.g. --classes 1,2,5-7");
  const std::vector<int64_t> ids = parse_classes(classes);
  opts.validate();
  if (threads > 0) hita::set_num_threads(threads);

  const std::optional<std::string> expect = app.count("--expect-manifest-sha256") ? std::optional(pin) : std::nullopt;
  hita::Host host(artifacts, device, expect);
  const hita::Generation g = host.generate(ids, opts, !no_images);

  std::vector<std::string> pngs;
  if (!no_images) {
    std::filesystem::create_directories(out_dir);
    for (size_t i = 0; i < g.images.size(); ++i) {
      char name[64];
      std::snprintf(name, sizeof(name), "%04zu_class%lld.png", i, static_cast<long long>(ids[i]));
      pngs.push_back((std::filesystem::path(out_dir) / name).string());
      hita::write_png(pngs.back(), g.images[i]);
    }
  }
  double step_sum = 0;
  for (double s : g.step_ms) step_sum += s;
  const double per_step = g.step_ms.empty() ? 0 : step_sum / static_cast<double>(g.step_ms.size());
  if (json) {
    std::cout << report(host, g, device, pngs, per_step).dump() << std::endl;
  } else {
    std::cout << "generated " << ids.size() << " image(s) with " << host.info().gpt_preset << " in "
              << g.total_ms / 1000.0 << " s (" << per_step << " ms/step)";
    if (!no_images) std::cout << "; wrote " << pngs.size() << " PNGs to " << out_dir;
    std::cout << std::endl;
  }
  return 0;
}

std::string first_line(const char* what) {
  std::string s = what;
  return s.substr(0, s.find('\n'));
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const hita::HostError& e) {
    std::cerr << "error: " << first_line(e.what()) << std::endl;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << first_line(e.what()) << std::endl;
    return 1;
  }
}
