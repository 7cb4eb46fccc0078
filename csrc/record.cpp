#include "record.h"

#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "errors.h"

namespace t2i {
namespace {

template <typename T>
T read_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));  // the format is little-endian, as every supported host
  return v;
}

const char* encoding_name(Encoding e) { return e == Encoding::kRaw ? "raw" : "jpeg"; }

}  // namespace

void check_spec(const DatasetSpec& spec) {
  auto require = [](bool ok, const char* message) {
    if (!ok) throw std::invalid_argument(message);
  };
  require(spec.count >= 0, "count must be non-negative");
  require(spec.height >= 1 && spec.height <= 65535, "image_height must be in [1, 65535]");
  require(spec.width >= 1 && spec.width <= 65535, "image_width must be in [1, 65535]");
  require(spec.doc_length >= 1 && spec.doc_length <= 65535, "doc_length must be in [1, 65535]");
  require(spec.encoding == Encoding::kRaw || spec.encoding == Encoding::kJpeg,
          "encoding must be raw or jpeg");
  require(spec.num_classes >= 1 && spec.num_classes <= (int64_t(1) << 32),
          "num_classes must be in [1, 2^32]");
}

RecordView parse_record(const uint8_t* data, size_t size, const DatasetSpec& spec,
                        const std::string& where) {
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
  // The messages match t2i_fast/data/format.py's, word for word.
  if (r.encoding != spec.encoding)
    throw CorruptRecord(where + ": " + encoding_name(r.encoding) + " pixels, the dataset's "
                        "encoding is " + encoding_name(spec.encoding));
  if (r.height != spec.height || r.width != spec.width)
    throw CorruptRecord(where + ": image " + std::to_string(r.height) + "x" +
                        std::to_string(r.width) + ", the dataset's image_size is " +
                        std::to_string(spec.height) + "x" + std::to_string(spec.width));
  if (r.doc_length != spec.doc_length)
    throw CorruptRecord(where + ": document length " + std::to_string(r.doc_length) +
                        ", the dataset's doc_length is " + std::to_string(spec.doc_length));
  if (r.class_id >= spec.num_classes)
    throw CorruptRecord(where + ": class id " + std::to_string(r.class_id) +
                        " outside the dataset's " + std::to_string(spec.num_classes) +
                        " classes");
  if (r.encoding == Encoding::kRaw && r.pixel_bytes != uint64_t(r.height) * r.width * 3)
    throw CorruptRecord(where + ": raw pixel bytes do not match " + std::to_string(r.height) +
                        "x" + std::to_string(r.width) + "x3");
  r.chars = data + kHeaderBytes;
  // The one-hot writer indexes channels by these bytes: one bound check here keeps the hot
  // path free of checks. A max-reduction, which the compiler vectorises.
  uint8_t largest = 0;
  for (uint64_t i = 0; i < char_bytes; ++i) largest = std::max(largest, r.chars[i]);
  if (largest > kAlphabetSize)
    throw CorruptRecord(where + ": character index " + std::to_string(largest) +
                        " outside the alphabet (1 to " + std::to_string(kAlphabetSize) +
                        ", 0 for padding)");
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
