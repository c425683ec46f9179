// PNG files through stb_image_write (libstb-dev). Its functions are compiled into this file only
// (STB_IMAGE_WRITE_STATIC), so they cannot clash with another copy inside libtorch or the embedder.
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb_image_write.h>

#include "hita/host.h"

namespace hita {

void write_png(const std::string& path, const Image& image) {
  if (image.width <= 0 || image.height <= 0 || image.rgb.size() != static_cast<size_t>(image.width) * image.height * 3)
    throw HostError(path + ": image buffer does not hold width x height x 3 bytes");
  if (!stbi_write_png(path.c_str(), image.width, image.height, 3, image.rgb.data(), image.width * 3))
    throw HostError(path + ": cannot be written; check that the folder exists and is writable");
}

}  // namespace hita
