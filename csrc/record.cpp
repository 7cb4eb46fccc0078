#include "record.h"

#include <zlib.h>

#include <cstring>

#include "errors.h"

namespace t2i {
namespace {

template <typename T>
T read_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));  // the format is little-endian, as every supported host
  return v;
}

}  // namespace

RecordView parse_record(const uint8_t* data, size_t size, const std::string& where) {
  if (size < size_t(kHeaderBytes))
    throw CorruptRecord(where + ": truncated record (" + std::to_string(size) + " bytes)");
  if (std::memcmp(data, "T2IR", 4) != 0)
    throw CorruptRecord(where + ": not a t2i-fast record (bad magic)");
  const uint16_t version = read_le<uint16_t>(data + 4);
  if (version != kFormatVersion)
    throw CorruptRecord(where + ": record format version " + std::to_string(version) +
                        ", expected " + std::to_string(kFormatVersion));
  RecordView r;
  r.data = data;
  r.size = size;
  const uint8_t encoding = data[6];
  const uint8_t channels = data[7];
  r.height = read_le<uint16_t>(data + 8);
  r.width = read_le<uint16_t>(data + 10);
  r.class_id = read_le<uint32_t>(data + 12);
  r.n_captions = read_le<uint16_t>(data + 16);
  r.doc_length = read_le<uint16_t>(data + 18);
  const uint64_t name_bytes = read_le<uint32_t>(data + 20);
  r.pixel_bytes = read_le<uint32_t>(data + 24);
  const uint64_t text_bytes = read_le<uint32_t>(data + 28);
  const uint64_t attr_bytes = read_le<uint32_t>(data + 32);
  r.crc = read_le<uint32_t>(data + kCrcOffset);
  const uint64_t char_bytes = uint64_t(r.n_captions) * uint64_t(r.doc_length);
  const uint64_t expected =
      kHeaderBytes + char_bytes + r.pixel_bytes + name_bytes + text_bytes + attr_bytes;
  if (expected != size || encoding > 1 || channels != 3)
    throw CorruptRecord(where + ": truncated or malformed record (" + std::to_string(size) +
                        " bytes, header says " + std::to_string(expected) + ")");
  if (r.n_captions < 1 || r.n_captions > kMaxCaptions)
    throw CorruptRecord(where + ": " + std::to_string(r.n_captions) +
                        " captions (the loader takes 1 to " + std::to_string(kMaxCaptions) + ")");
  r.encoding = Encoding(encoding);
  if (r.encoding == Encoding::kRaw && r.pixel_bytes != uint64_t(r.height) * r.width * 3)
    throw CorruptRecord(where + ": raw pixel bytes do not match " + std::to_string(r.height) +
                        "x" + std::to_string(r.width) + "x3");
  r.chars = data + kHeaderBytes;
  r.pixels = r.chars + char_bytes;
  return r;
}

void verify_crc(const RecordView& rec, const std::string& where) {
  uLong crc = crc32(0L, rec.data, kCrcOffset);
  // zlib takes lengths as uInt: records stay far below 4 GiB (lengths are 32-bit fields).
  crc = crc32(crc, rec.data + kHeaderBytes, uInt(rec.size - kHeaderBytes));
  if (uint32_t(crc) != rec.crc) throw CorruptRecord(where + ": checksum mismatch (corrupt record)");
}

}  // namespace t2i
