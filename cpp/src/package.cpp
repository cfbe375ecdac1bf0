#include "rrcm/package.h"

#include <stdlib.h>  // mkdtemp, setenv, unsetenv (POSIX)

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include "rrcm/archive.h"
#include "rrcm/errors.h"

namespace rrcm {
namespace {

namespace fs = std::filesystem;

// A fresh folder rrcm-aoti-XXXXXX in the temporary folder (TMPDIR, else /tmp).
std::string make_private_folder(const std::string& path) {
  std::error_code error;
  const fs::path base = fs::temp_directory_path(error);
  if (error) throw UserError(path + ": cannot load AOTInductor package: no temporary folder (" + error.message() + ")");
  std::string folder = (base / "rrcm-aoti-XXXXXX").string();
  if (mkdtemp(folder.data()) == nullptr) {
    throw UserError(path + ": cannot load AOTInductor package: cannot make a folder in " + base.string() + " (" +
                    std::strerror(errno) + ")");
  }
  return folder;
}

// TMPDIR is `folder` while this object lives, then what it was.
class TmpdirSetting {
 public:
  explicit TmpdirSetting(const std::string& folder) {
    if (const char* previous = std::getenv("TMPDIR")) previous_ = previous;
    setenv("TMPDIR", folder.c_str(), 1);
  }
  ~TmpdirSetting() {
    if (previous_) {
      setenv("TMPDIR", previous_->c_str(), 1);
    } else {
      unsetenv("TMPDIR");
    }
  }
  TmpdirSetting(const TmpdirSetting&) = delete;
  TmpdirSetting& operator=(const TmpdirSetting&) = delete;

 private:
  std::optional<std::string> previous_;
};

std::string describe(const std::exception& e) {
  const auto* error = dynamic_cast<const c10::Error*>(&e);
  return first_line(error ? error->what_without_backtrace() : e.what());
}

void remove_folder(const std::string& folder) {
  std::error_code ignored;
  fs::remove_all(folder, ignored);
}

}  // namespace

void PackageDeleter::operator()(torch::inductor::AOTIModelPackageLoader* loader) const {
  delete loader;
  remove_folder(folder);
}

Package load_package(const std::string& path, int device_index) {
  const std::vector<ZipEntry> entries = check_zip(path, "AOTInductor package");
  check_package_layout(path, entries);
  uint64_t unpacked = 0;
  for (const auto& e : entries) unpacked += e.size;  // at most kMaxUnpackedBytes: check_zip's limit
  PackageDeleter deleter{make_private_folder(path)};
  std::error_code error;
  const fs::space_info space = fs::space(deleter.folder, error);
  if (!error && space.available < unpacked) {
    remove_folder(deleter.folder);
    char mib[32];
    std::snprintf(mib, sizeof mib, "%.0f", static_cast<double>(unpacked) / (1 << 20));
    throw UserError(path + ": cannot load AOTInductor package: it unpacks to " + mib + " MiB, more than the free space in " +
                    fs::path(deleter.folder).parent_path().string());
  }
  try {
    TmpdirSetting tmpdir(deleter.folder);
    auto* loader = new torch::inductor::AOTIModelPackageLoader(path, "model", false, 1,
                                                                static_cast<c10::DeviceIndex>(device_index));
    return Package(loader, std::move(deleter));
  } catch (const std::exception& e) {
    remove_folder(deleter.folder);
    throw UserError(path + ": cannot load AOTInductor package (" + describe(e) +
                    "); it needs the torch version and device type it was compiled for");
  }
}

}  // namespace rrcm
