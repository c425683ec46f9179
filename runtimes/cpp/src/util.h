// Small self-contained pieces of the host: sha256, PNG writing. No torch, no third-party code.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace hita::detail {

// Lower-case hex sha256 of a byte string / of a file (read in 1 MiB chunks).
std::string sha256_hex(const std::string& bytes);
std::string sha256_file(const std::string& path);  // throws std::runtime_error if unreadable

// 8-bit RGB PNG (filter 0 on every row). Uses zlib's deflate when the build found zlib
// (HITA_HAVE_ZLIB), else stored (uncompressed) deflate blocks; both are valid PNGs.
void write_png_rgb(const std::string& path, int width, int height, const uint8_t* rgb);

}  // namespace hita::detail
