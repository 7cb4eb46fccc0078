// JPEG records, decoded with libjpeg-turbo through the libjpeg API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace t2i {

// Decodes a JPEG of exactly height x width into `out` (uint8 RGB, HWC); throws CorruptRecord
// naming `where` when it does not decode, or when its header claims another size or other than
// 3 colour components (checked before the decoder allocates anything for the image).
void decode_jpeg(const uint8_t* data, size_t size, int height, int width, uint8_t* out,
                 const std::string& where);

}  // namespace t2i
