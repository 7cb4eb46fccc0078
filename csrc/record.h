// The binary record of docs/format.md (t2i_fast/data/format.py writes it).
#pragma once

#include <cstdint>
#include <string>

namespace t2i {

constexpr int kHeaderBytes = 64;
constexpr int kCrcOffset = 60;
constexpr uint16_t kFormatVersion = 1;
constexpr int kMaxCaptions = 255;
constexpr int kAlphabetSize = 70;  // character indices 1..70; 0 is padding

enum class Encoding : uint8_t { kRaw = 0, kJpeg = 1 };

// What every record of a dataset must agree with: the metadata record's fields (Python checks
// the metadata itself, t2i_fast/data/format.py, and hands these over).
struct DatasetSpec {
  int64_t count = 0;        // records under keys 00000000...
  int height = 0, width = 0;  // image_size
  int doc_length = 0;
  Encoding encoding = Encoding::kRaw;
  int64_t num_classes = 0;  // len(classes): class ids lie in [0, num_classes)
};

// Throws std::invalid_argument naming the first field out of range.
void check_spec(const DatasetSpec& spec);

struct RecordView {
  const uint8_t* data = nullptr;  // the whole record, inside the LMDB memory map
  size_t size = 0;
  Encoding encoding = Encoding::kRaw;
  int height = 0, width = 0;
  int64_t class_id = 0;
  int n_captions = 0, doc_length = 0;
  const uint8_t* chars = nullptr;  // [n_captions, doc_length], every index <= kAlphabetSize
  const uint8_t* pixels = nullptr;
  size_t pixel_bytes = 0;
  uint32_t crc = 0;
};

// Parses and checks the header, the lengths it claims, the character indices and the fields
// the dataset's metadata fixes (`spec`), so that nothing later sizes a buffer or indexes one by
// an unchecked byte; throws CorruptRecord with `where` (file and key) in the message. The
// checksum is checked separately (verify_crc), once.
RecordView parse_record(const uint8_t* data, size_t size, const DatasetSpec& spec,
                        const std::string& where);

// Throws CorruptRecord when the record's CRC-32 does not match its bytes.
void verify_crc(const RecordView& rec, const std::string& where);

}  // namespace t2i
