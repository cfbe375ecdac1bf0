// Zip archives checked before any loader sees them (what rrcm/archive.py does for Python).
//
// torch's AOTInductor loader extracts the entries of a package to <temp folder>/<entry name>, so a name with
// '..' writes outside it, even when the package is then refused. `check_zip` refuses such archives, and
// archives whose sizes could fill a disk, by reading only the end record, the central directory and the local
// headers: nothing is extracted or decompressed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace rrcm {

constexpr uint64_t kMaxZipEntries = 100000;
constexpr uint64_t kMaxUnpackedBytes = uint64_t{1} << 40;  // 1 TiB, far above any model rrcm trains or exports
constexpr uint64_t kMaxCompressionRatio = 200;             // of one compressed entry (deflate tops out near 1032)

// One entry of a zip archive's central directory.
struct ZipEntry {
  std::string name;
  uint16_t method = 0;  // 0: stored
  uint64_t compressed_size = 0, size = 0, header_offset = 0;
  uint32_t external_attr = 0;  // the upper 16 bits: a Unix st_mode, 0 where the archive does not say
};

// The entries of zip archive `path` (ZIP64 included), after checking that every one could be extracted inside
// a folder: relative names without '..', backslashes or control characters, no links or special files, no
// duplicates, local headers that name the file the directory names, at most kMaxZipEntries entries and
// `max_total_bytes` unpacked, compression ratios up to kMaxCompressionRatio. Anything else is a UserError
// naming the file (and the entry): "PATH: unsafe WHAT: entry 'NAME': PROBLEM" or "PATH: corrupt WHAT (...)".
std::vector<ZipEntry> check_zip(const std::string& path, const std::string& what = "archive",
                                uint64_t max_total_bytes = kMaxUnpackedBytes);

// Throws UserError unless `entries` have the layout `rrcm export aoti` writes: one folder holding a compiled
// model library (data/aotinductor/model/*.so). torch compiles a package without one with commands named in it.
void check_package_layout(const std::string& path, const std::vector<ZipEntry>& entries);

}  // namespace rrcm
