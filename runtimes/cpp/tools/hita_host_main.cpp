// hita-host: generate class-conditional images from an AOTI artifacts folder, as PNG files.
//
//   hita-host --artifacts DIR --classes 1,2,5-7 [--out DIR] [--cfg-scale 1.5] [--cfg-interval -1]
//             [--temperature 1] [--top-k 0] [--top-p 1] [--seed 0] [--row-offset 0]
//             [--device cpu] [--threads N] [--no-images] [--json]
//
// Exit status: 0 success; 2 refused input or artifacts (one line "error: ..." on stderr);
// 1 any other failure. --json prints one JSON object on stdout: class ids, tokens, timings, PNGs.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "hita/host.h"

namespace {

const char* kUsage =
    "usage: hita-host --artifacts DIR --classes IDS [--out DIR] [--cfg-scale F] [--cfg-interval K]\n"
    "                 [--temperature F] [--top-k K] [--top-p F] [--seed S] [--row-offset R]\n"
    "                 [--device cpu|cuda[:i]] [--threads N] [--no-images] [--json]\n"
    "IDS: comma-separated class ids or ranges, e.g. 1,2,5-7. PNGs go to --out (default out/host).\n";

[[noreturn]] void bad(const std::string& msg) { throw hita::HostError(msg); }

std::vector<int64_t> parse_classes(const std::string& spec) {
  std::vector<int64_t> ids;
  std::stringstream ss(spec);
  std::string part;
  while (std::getline(ss, part, ',')) {
    if (part.empty()) continue;
    try {
      size_t dash = part.find('-', 1);
      size_t used = 0;
      if (dash == std::string::npos) {
        ids.push_back(std::stoll(part, &used));
        if (used != part.size()) throw std::invalid_argument(part);
      } else {
        int64_t a = std::stoll(part.substr(0, dash), &used);
        if (used != dash) throw std::invalid_argument(part);
        std::string rest = part.substr(dash + 1);
        int64_t b = std::stoll(rest, &used);
        if (used != rest.size()) throw std::invalid_argument(part);
        for (int64_t c = a; c <= b; ++c) ids.push_back(c);
      }
    } catch (const std::logic_error&) {
      bad("cannot read class list '" + spec + "'; use e.g. --classes 1,2,5-7");
    }
  }
  if (ids.empty()) bad("no class ids given; pass --classes 1,2,3");
  return ids;
}

template <typename T>
T number(const std::string& flag, const std::string& text) {
  std::istringstream is(text);
  T v{};
  is >> v;
  if (!is || !is.eof()) bad(flag + " expects a number, got '" + text + "'");
  return v;
}

std::string json_list(const std::vector<double>& v) {
  std::ostringstream os;
  os.precision(6);
  os << '[';
  for (size_t i = 0; i < v.size(); ++i) os << (i ? "," : "") << v[i];
  return os.str() + ']';
}

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + '"';
}

int run(int argc, char** argv) {
  std::string artifacts, classes, out_dir = "out/host", device = "cpu";
  hita::SamplingOptions opts;
  bool images = true, json = false;
  int threads = 0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) bad(a + " needs a value\n" + kUsage);
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (a == "--artifacts") artifacts = value();
    else if (a == "--classes") classes = value();
    else if (a == "--out") out_dir = value();
    else if (a == "--device") device = value();
    else if (a == "--cfg-scale") opts.cfg_scale = number<double>(a, value());
    else if (a == "--cfg-interval") opts.cfg_interval = number<int64_t>(a, value());
    else if (a == "--temperature") opts.temperature = number<double>(a, value());
    else if (a == "--top-k") opts.top_k = number<int64_t>(a, value());
    else if (a == "--top-p") opts.top_p = number<double>(a, value());
    else if (a == "--seed") opts.seed = number<uint64_t>(a, value());
    else if (a == "--row-offset") opts.row_offset = number<uint64_t>(a, value());
    else if (a == "--threads") threads = number<int>(a, value());
    else if (a == "--no-images") images = false;
    else if (a == "--json") json = true;
    else bad("unknown option '" + a + "'; see hita-host --help");
  }
  if (artifacts.empty()) bad("pass --artifacts DIR (a folder made by `hita export --engine aoti`)");
  if (classes.empty()) bad("pass --classes, e.g. --classes 1,2,5-7");
  std::vector<int64_t> ids = parse_classes(classes);
  opts.validate();
  if (threads > 0) hita::set_num_threads(threads);

  hita::Host host(artifacts, device);
  hita::Generation g = host.generate(ids, opts, images);

  std::vector<std::string> pngs;
  if (images) {
    std::filesystem::create_directories(out_dir);
    for (size_t i = 0; i < g.images.size(); ++i) {
      char name[64];
      std::snprintf(name, sizeof(name), "%04zu_class%lld.png", i, static_cast<long long>(ids[i]));
      std::string path = (std::filesystem::path(out_dir) / name).string();
      hita::write_png(path, g.images[i]);
      pngs.push_back(path);
    }
  }
  double step_sum = 0;
  for (double s : g.step_ms) step_sum += s;
  const double per_step = g.step_ms.empty() ? 0 : step_sum / static_cast<double>(g.step_ms.size());
  if (json) {
    std::ostringstream os;
    os << "{\"class_ids\":[";
    for (size_t i = 0; i < ids.size(); ++i) os << (i ? "," : "") << ids[i];
    os << "],\"tokens\":[";
    for (size_t i = 0; i < g.tokens.size(); ++i) {
      os << (i ? "," : "") << '[';
      for (size_t t = 0; t < g.tokens[i].size(); ++t) os << (t ? "," : "") << g.tokens[i][t];
      os << ']';
    }
    os << "],\"prefill_ms\":" << g.prefill_ms << ",\"step_ms\":" << json_list(g.step_ms) << ",\"forward_ms\":" << json_list(g.forward_ms)
       << ",\"mean_step_ms\":" << per_step << ",\"decode_image_ms\":" << g.decode_image_ms
       << ",\"seconds\":" << g.total_ms / 1000.0 << ",\"device\":" << quote(device)
       << ",\"torch\":" << quote(hita::torch_version()) << ",\"pngs\":[";
    for (size_t i = 0; i < pngs.size(); ++i) os << (i ? "," : "") << quote(pngs[i]);
    os << "]}";
    std::cout << os.str() << std::endl;
  } else {
    std::cout << "generated " << ids.size() << " image(s) with " << host.info().gpt_preset << " in "
              << g.total_ms / 1000.0 << " s (" << per_step << " ms/step)";
    if (images) std::cout << "; wrote " << pngs.size() << " PNGs to " << out_dir;
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
