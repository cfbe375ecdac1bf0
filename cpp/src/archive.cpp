#include "rrcm/archive.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <limits>
#include <set>
#include <string_view>
#include <unordered_set>

#include "rrcm/errors.h"

namespace rrcm {
namespace {

constexpr uint32_t kLocalSignature = 0x04034b50, kCentralSignature = 0x02014b50, kZip64EndSignature = 0x06064b50,
                   kZip64LocatorSignature = 0x07064b50;
constexpr std::string_view kEndSignature("PK\x05\x06", 4);
constexpr uint64_t kEndSize = 22, kZip64EndSize = 56, kLocatorSize = 20, kCentralSize = 46, kLocalSize = 30;
constexpr uint64_t kUnset32 = 0xFFFFFFFF;  // a 32-bit size or offset whose value is in the ZIP64 extra field
// Unix file types in the upper half of an entry's external attributes (st_mode, the same on every system).
constexpr uint32_t kTypeMask = 0170000, kRegular = 0100000, kDirectory = 0040000;

// The little-endian integer of `bytes` bytes at `at` in `data`.
uint64_t le(const std::string& data, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = v << 8 | static_cast<unsigned char>(data[at + i]);
  return v;
}

// Byte ranges of an archive file; a range past its end makes it a corrupt archive.
class ArchiveFile {
 public:
  ArchiveFile(const std::string& path, const std::string& what)
      : path_(path), what_(what), in_(path, std::ios::binary | std::ios::ate) {
    if (!in_) throw UserError(path + ": cannot open " + what);
    size_ = static_cast<uint64_t>(in_.tellg());
  }

  uint64_t size() const { return size_; }

  std::string read(uint64_t offset, uint64_t n) {
    if (offset > size_ || n > size_ - offset) corrupt("truncated");
    std::string bytes(n, '\0');
    in_.seekg(static_cast<std::streamoff>(offset));
    in_.read(bytes.data(), static_cast<std::streamsize>(n));
    if (!in_) corrupt("read error");
    return bytes;
  }

  [[noreturn]] void corrupt(const std::string& why) const {
    throw UserError(path_ + ": corrupt " + what_ + " (" + why + ")");
  }

 private:
  std::string path_, what_;
  std::ifstream in_;
  uint64_t size_ = 0;
};

struct Directory {
  uint64_t entries, size, offset;
};

// The central directory from the end record, or from the ZIP64 end record where a locator precedes the end
// record (as torch writes, and as torch's loader reads it). The directory must end where the (ZIP64) end
// record begins: the entries checked here are the ones every zip reader finds.
Directory find_directory(ArchiveFile& f) {
  const uint64_t tail_size = std::min<uint64_t>(f.size(), kEndSize + 0xFFFF);  // the end record and a comment
  const uint64_t tail_start = f.size() - tail_size;
  const std::string tail = f.read(tail_start, tail_size);
  const size_t at = tail_size < kEndSize ? std::string::npos : tail.rfind(kEndSignature, tail_size - kEndSize);
  if (at == std::string::npos) f.corrupt("not a zip archive");
  const uint64_t end = tail_start + at;
  if (le(tail, at + 4, 2) != 0 || le(tail, at + 6, 2) != 0) f.corrupt("spans several disks");
  Directory d{le(tail, at + 10, 2), le(tail, at + 12, 4), le(tail, at + 16, 4)};
  uint64_t directory_end = end;
  if (end >= kLocatorSize) {
    const std::string locator = f.read(end - kLocatorSize, kLocatorSize);
    if (le(locator, 0, 4) == kZip64LocatorSignature) {
      const uint64_t record = le(locator, 8, 8);
      if (record > end - kLocatorSize || end - kLocatorSize - record != kZip64EndSize) {
        f.corrupt("the ZIP64 end record is not where its locator says");
      }
      const std::string r = f.read(record, kZip64EndSize);
      if (le(r, 0, 4) != kZip64EndSignature || le(r, 4, 8) != kZip64EndSize - 12) f.corrupt("bad ZIP64 end record");
      if (le(locator, 4, 4) != 0 || le(locator, 16, 4) > 1 || le(r, 16, 4) != 0 || le(r, 20, 4) != 0) {
        f.corrupt("spans several disks");
      }
      d = {le(r, 32, 8), le(r, 40, 8), le(r, 48, 8)};
      directory_end = record;
    }
  }
  if (d.offset > directory_end || directory_end - d.offset != d.size) {
    f.corrupt("the central directory is not where the end record says");
  }
  return d;
}

// The 64-bit sizes and offset of the ZIP64 extra field (id 1) for those whose 32-bit fields are unset.
void read_zip64_extra(const std::string& extra, ZipEntry& e, const ArchiveFile& f) {
  for (size_t at = 0; at + 4 <= extra.size();) {
    const uint64_t id = le(extra, at, 2), length = le(extra, at + 2, 2);
    if (at + 4 + length > extra.size()) f.corrupt("bad extra field in entry " + e.name);
    if (id == 1) {
      size_t field = at + 4;
      for (uint64_t* value : {&e.size, &e.compressed_size, &e.header_offset}) {
        if (*value != kUnset32) continue;
        if (field + 8 > at + 4 + length) f.corrupt("bad ZIP64 extra field in entry " + e.name);
        *value = le(extra, field, 8);
        field += 8;
      }
    }
    at += 4 + length;
  }
}

// Why an entry name could not be extracted inside a folder, or "".
std::string name_problem(const std::string& name) {
  if (name.empty() || name[0] == '/' || name.find('\\') != std::string::npos || (name.size() > 1 && name[1] == ':')) {
    return "absolute or non-portable path";
  }
  if (std::any_of(name.begin(), name.end(), [](unsigned char c) { return c < 32; })) {
    return "control character in the name";
  }
  for (size_t start = 0; start <= name.size();) {
    const size_t end = std::min(name.find('/', start), name.size());
    if (name.compare(start, end - start, "..") == 0) return "'..' in the path";
    start = end + 1;
  }
  return "";
}

// Whether the local header of `e` (what extraction reads) exists and names the file the directory names.
bool header_agrees(ArchiveFile& f, const ZipEntry& e) {
  if (e.header_offset > f.size() || f.size() - e.header_offset < kLocalSize) return false;
  const std::string header = f.read(e.header_offset, kLocalSize);
  return le(header, 0, 4) == kLocalSignature && le(header, 26, 2) == e.name.size() &&
         f.read(e.header_offset + kLocalSize, e.name.size()) == e.name;
}

// `name` quoted for a one-line message: control characters, quotes and backslashes escaped.
std::string quote(const std::string& name) {
  std::string out = "'";
  for (unsigned char c : name) {
    if (c == '\\' || c == '\'') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 32 || c == 127) {
      char escaped[8];
      std::snprintf(escaped, sizeof escaped, "\\x%02x", c);
      out += escaped;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "'";
}

std::string gib(uint64_t bytes, const char* format) {
  char text[64];
  std::snprintf(text, sizeof text, format, static_cast<double>(bytes) / (1 << 30));
  return text;
}

}  // namespace

std::vector<ZipEntry> check_zip(const std::string& path, const std::string& what, uint64_t max_total_bytes) {
  ArchiveFile f(path, what);
  const Directory d = find_directory(f);
  if (d.entries > kMaxZipEntries) {
    throw UserError(path + ": " + std::to_string(d.entries) + " entries in the " + what + ", more than " +
                    std::to_string(kMaxZipEntries));
  }
  std::vector<ZipEntry> entries;
  std::unordered_set<std::string> seen;
  uint64_t at = d.offset, total = 0;
  const uint64_t directory_end = d.offset + d.size;
  for (uint64_t i = 0; i < d.entries; ++i) {
    if (directory_end - at < kCentralSize) f.corrupt("the central directory ends inside an entry");
    const std::string header = f.read(at, kCentralSize);
    if (le(header, 0, 4) != kCentralSignature) f.corrupt("bad central directory entry");
    const uint64_t name_size = le(header, 28, 2), extra_size = le(header, 30, 2), comment_size = le(header, 32, 2);
    const uint64_t entry_size = kCentralSize + name_size + extra_size + comment_size;
    if (directory_end - at < entry_size) f.corrupt("the central directory ends inside an entry");
    const std::string name_and_extra = f.read(at + kCentralSize, name_size + extra_size);
    ZipEntry e;
    e.name = name_and_extra.substr(0, name_size);
    e.method = static_cast<uint16_t>(le(header, 10, 2));
    e.compressed_size = le(header, 20, 4);
    e.size = le(header, 24, 4);
    e.external_attr = static_cast<uint32_t>(le(header, 38, 4));
    e.header_offset = le(header, 42, 4);
    read_zip64_extra(name_and_extra.substr(name_size), e, f);
    at += entry_size;

    std::string problem = name_problem(e.name);
    const uint32_t kind = (e.external_attr >> 16) & kTypeMask;  // 0: the archive does not say
    if (problem.empty() && kind != 0 && kind != kRegular && kind != kDirectory) problem = "a link or special file";
    if (problem.empty() && seen.count(e.name)) problem = "a duplicate name";
    const uint64_t packed = std::max<uint64_t>(e.compressed_size, 1);
    if (problem.empty() && e.method != 0 && packed <= std::numeric_limits<uint64_t>::max() / kMaxCompressionRatio &&
        e.size > kMaxCompressionRatio * packed) {
      problem = "compressed more than " + std::to_string(kMaxCompressionRatio) + ":1";
    }
    if (problem.empty() && !header_agrees(f, e)) problem = "its local header names another file";
    if (!problem.empty()) throw UserError(path + ": unsafe " + what + ": entry " + quote(e.name) + ": " + problem);
    seen.insert(e.name);
    total = e.size > std::numeric_limits<uint64_t>::max() - total ? std::numeric_limits<uint64_t>::max() : total + e.size;
    entries.push_back(std::move(e));
  }
  if (at != directory_end) {
    f.corrupt("the central directory holds more than the " + std::to_string(d.entries) + " entries its end record counts");
  }
  if (total > max_total_bytes) {
    throw UserError(path + ": the " + what + " would unpack to " + gib(total, "%.1f") + " GiB, more than " +
                    gib(max_total_bytes, "%.0f") + " GiB");
  }
  return entries;
}

void check_package_layout(const std::string& path, const std::vector<ZipEntry>& entries) {
  std::set<std::string> folders;
  bool library = false;
  for (const auto& e : entries) {
    const size_t slash = e.name.find('/');
    folders.insert(e.name.substr(0, slash));
    const std::string inside = slash == std::string::npos ? e.name : e.name.substr(slash + 1);
    const bool so = e.name.size() >= 3 && e.name.compare(e.name.size() - 3, 3, ".so") == 0;
    library = library || (inside.rfind("data/aotinductor/model/", 0) == 0 && so);
  }
  if (entries.size() < 2 || folders.size() != 1 || !library) {
    throw UserError(path + ": cannot load AOTInductor package (not the layout 'rrcm export aoti' writes: one folder "
                    "holding a compiled model library)");
  }
}

}  // namespace rrcm
