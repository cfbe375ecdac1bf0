"""Zip archives checked before any loader sees them: AOTInductor packages (.pt2) and torch.save files.

Loaders trust an archive's entry names: torch's AOTInductor loader extracts every entry under
`data/aotinductor/<model>/` to `<temp folder>/<entry name>`, so a name with `..` writes outside it.
`check_zip` refuses such archives, and archives whose sizes could fill a disk or memory, by reading
only the zip directory and the local headers: nothing is extracted or decompressed.
"""
from __future__ import annotations

import stat
import struct
import zipfile
from pathlib import Path

from rrcm.errors import UserError

MAX_ENTRIES = 100_000
MAX_TOTAL_BYTES = 1 << 40  # uncompressed: 1 TiB, far above any model this tool trains or exports
MAX_RATIO = 200  # uncompressed / compressed size of one deflated entry (deflate tops out near 1032)
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length


def _name_problem(name: str) -> str | None:
    """Why an entry name could not be extracted inside a folder, or None."""
    if not name or name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        return "absolute or non-portable path"
    if any(ord(c) < 32 for c in name):
        return "control character in the name"
    if ".." in name.split("/"):
        return "'..' in the path"
    return None


def _header_name(f, info: zipfile.ZipInfo) -> bytes | None:
    """The file name in an entry's local header (what extraction reads), or None where there is no header."""
    f.seek(info.header_offset)
    signature, name_length, _ = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    return f.read(name_length) if signature == b"PK\x03\x04" else None


def check_zip(path: str | Path, what: str = "archive", max_total_bytes: int = MAX_TOTAL_BYTES) -> list[zipfile.ZipInfo]:
    """The entries of zip archive `path`, after checking that every one could be extracted inside a folder:
    relative names without '..', no links or special files, no duplicates, local headers that agree with
    the directory, at most MAX_ENTRIES entries and `max_total_bytes` uncompressed, compression ratios below
    MAX_RATIO. Anything else is a UserError naming the file and the entry."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if not zipfile.is_zipfile(f):
                raise UserError(f"{path}: corrupt {what} (not a zip archive)")
            with zipfile.ZipFile(f) as z:
                entries = z.infolist()
                if len(entries) > MAX_ENTRIES:
                    raise UserError(f"{path}: {len(entries)} entries in the {what}, more than {MAX_ENTRIES}")
                seen, total = set(), 0
                for info in entries:
                    name = info.filename
                    problem = _name_problem(name)
                    kind = stat.S_IFMT(info.external_attr >> 16)  # 0: the archive does not say
                    if problem is None and kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                        problem = "a link or special file"
                    if problem is None and name in seen:
                        problem = "a duplicate name"
                    if problem is None and info.compress_type != zipfile.ZIP_STORED and \
                            info.file_size > MAX_RATIO * max(info.compress_size, 1):
                        problem = f"compressed more than {MAX_RATIO}:1"
                    if problem is None and _header_name(f, info) != info.orig_filename.encode(
                            "utf-8" if info.flag_bits & 0x800 else "cp437"):
                        problem = "its local header names another file"
                    if problem is not None:
                        raise UserError(f"{path}: unsafe {what}: entry {name!r}: {problem}")
                    seen.add(name)
                    total += info.file_size
                if total > max_total_bytes:
                    raise UserError(f"{path}: the {what} would unpack to {total / 2**30:.1f} GiB, more than "
                                    f"{max_total_bytes / 2**30:.0f} GiB")
    except (OSError, zipfile.BadZipFile, struct.error, UnicodeEncodeError, EOFError) as e:
        raise UserError(f"{path}: corrupt {what} ({type(e).__name__}: {e})") from None
    return entries
