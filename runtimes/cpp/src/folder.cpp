#include "folder.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <vector>

#include "hita/host.h"

namespace hita::detail {
namespace {

// Incremental sha256 over OpenSSL's EVP interface (the digest OpenSSL keeps fast and correct).
class Sha256 {
 public:
  Sha256() : ctx_(EVP_MD_CTX_new(), EVP_MD_CTX_free) {
    if (!ctx_ || EVP_DigestInit_ex(ctx_.get(), EVP_sha256(), nullptr) != 1)
      throw std::runtime_error("OpenSSL could not start a sha256 digest");
  }
  void update(const void* data, size_t n) {
    if (EVP_DigestUpdate(ctx_.get(), data, n) != 1) throw std::runtime_error("OpenSSL sha256 update failed");
  }
  std::string hex() {
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    if (EVP_DigestFinal_ex(ctx_.get(), digest, &len) != 1) throw std::runtime_error("OpenSSL sha256 final failed");
    static const char* kHex = "0123456789abcdef";
    std::string out;
    for (unsigned int i = 0; i < len; ++i) {
      out += kHex[digest[i] >> 4];
      out += kHex[digest[i] & 15];
    }
    return out;
  }

 private:
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx_;
};

std::string errno_text() { return std::strerror(errno); }

// Closes a file descriptor on scope exit.
struct FdGuard {
  int fd;
  ~FdGuard() {
    if (fd >= 0) ::close(fd);
  }
};

// Calls f(block, n) for each block of an open file; false with errno set on a read error.
template <typename F>
bool for_each_block(int fd, F f) {
  std::vector<char> buf(1 << 20);
  for (;;) {
    const ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return false;
    if (n == 0) return true;
    f(buf.data(), static_cast<size_t>(n));
  }
}

}  // namespace

Fingerprint fingerprint_of(const struct stat& st) {
  return {static_cast<uint64_t>(st.st_ino), static_cast<int64_t>(st.st_size),
          static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec};
}

Folder::Folder(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd_ < 0 && (errno == ENOENT || errno == ENOTDIR))
    throw HostError(path + ": no such artifacts folder; create it with `hita export --engine aoti`");
  if (fd_ < 0) throw HostError(path + ": cannot open the artifacts folder (" + errno_text() + ")");
}

Folder::~Folder() {
  if (fd_ >= 0) ::close(fd_);
}

std::optional<std::string> Folder::read(const std::string& name) const {
  const int fd = ::openat(fd_, name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0 && errno == ENOENT) return std::nullopt;
  if (fd < 0) throw HostError(path_ + "/" + name + ": unreadable (" + errno_text() + ")");
  FdGuard guard{fd};
  std::string out;
  if (!for_each_block(fd, [&](const char* p, size_t n) { out.append(p, n); }))
    throw HostError(path_ + "/" + name + ": unreadable (" + errno_text() + ")");
  return out;
}

std::optional<struct stat> Folder::stat(const std::string& name) const {
  struct stat st {};
  if (::fstatat(fd_, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) return std::nullopt;
  return st;
}

std::string Folder::sha256(const std::string& name) const {
  const int fd = ::openat(fd_, name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) throw HostError(name + ": unreadable in " + path_ + " (" + errno_text() + ")");
  FdGuard guard{fd};
  Sha256 h;
  if (!for_each_block(fd, [&](const char* p, size_t n) { h.update(p, n); }))
    throw HostError(name + ": unreadable in " + path_ + " (" + errno_text() + ")");
  return h.hex();
}

bool Folder::replaced() const {
  struct stat now {}, held {};
  if (::stat(path_.c_str(), &now) != 0 || ::fstat(fd_, &held) != 0) return true;
  return now.st_ino != held.st_ino || now.st_dev != held.st_dev;
}

std::string sha256_hex(const std::string& bytes) {
  Sha256 h;
  h.update(bytes.data(), bytes.size());
  return h.hex();
}

}  // namespace hita::detail
