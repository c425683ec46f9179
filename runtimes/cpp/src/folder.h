// One opened artifacts folder and the sha256 of bytes and files. No torch, no JSON.
//
// Every read goes through one directory handle (openat / fstatat), so when a concurrent export
// swaps a new folder in at the same path, the manifest and the files checked all come from the
// folder that was opened, never a mix of two.
#pragma once

#include <sys/stat.h>

#include <cstdint>
#include <optional>
#include <string>

namespace hita::detail {

// What identifies a file's content cheaply: taken before hashing, compared after loading, so a
// file replaced in between is caught (Python: export/manifest.py _fingerprint / check_unchanged).
struct Fingerprint {
  uint64_t inode = 0;
  int64_t size = 0;
  int64_t mtime_ns = 0;
  bool operator==(const Fingerprint& o) const { return inode == o.inode && size == o.size && mtime_ns == o.mtime_ns; }
};
Fingerprint fingerprint_of(const struct stat& st);

class Folder {
 public:
  // Opens `path` (O_DIRECTORY). Throws HostError when it is not a readable folder.
  explicit Folder(const std::string& path);
  ~Folder();
  Folder(const Folder&) = delete;
  Folder& operator=(const Folder&) = delete;

  const std::string& path() const { return path_; }
  // The bytes of a plain file in the folder; nullopt when it does not exist. Symlinks are refused
  // (O_NOFOLLOW) like a missing file would be. Throws HostError when it cannot be read.
  std::optional<std::string> read(const std::string& name) const;
  // lstat of an entry; nullopt when it does not exist.
  std::optional<struct stat> stat(const std::string& name) const;
  // Lower-case hex sha256 of a file, read in 1 MiB blocks.
  std::string sha256(const std::string& name) const;
  // Whether `path` now names another folder than the one held open (a concurrent export replaced it).
  bool replaced() const;

 private:
  std::string path_;
  int fd_ = -1;
};

// Lower-case hex sha256 of a byte string (OpenSSL EVP).
std::string sha256_hex(const std::string& bytes);

}  // namespace hita::detail
