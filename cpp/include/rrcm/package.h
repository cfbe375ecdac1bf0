// An `rrcm export aoti` package loaded through torch's AOTInductor loader, checked first (what
// export/aoti.py's load_package does for Python).
#pragma once

#include <memory>
#include <string>

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace rrcm {

// Destroys a loader, then removes the private folder it unpacked its package into.
struct PackageDeleter {
  std::string folder;
  void operator()(torch::inductor::AOTIModelPackageLoader* loader) const;
};

using Package = std::unique_ptr<torch::inductor::AOTIModelPackageLoader, PackageDeleter>;

// torch's loader for the package `path` (`device_index`: the GPU of a CUDA package, -1 the current one), after
// check_zip and check_package_layout. The loader unpacks the package into a folder it makes under TMPDIR and
// leaves it behind when the load fails; here TMPDIR is a private folder (rrcm-aoti-XXXXXX in the temporary
// folder), removed after a failed load and with the returned package. TMPDIR is set in the process
// environment while loading: load packages while no other thread reads the environment.
// Throws UserError with a one-line message.
Package load_package(const std::string& path, int device_index = -1);

}  // namespace rrcm
