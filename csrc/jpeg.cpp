#include "jpeg.h"

#include <csetjmp>
#include <cstdio>
// jpeglib.h needs FILE and size_t declared first.
#include <jpeglib.h>

#include "errors.h"

namespace t2i {
namespace {

struct ErrorManager {
  jpeg_error_mgr pub;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void on_error(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<ErrorManager*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

// libjpeg only warns about corrupt or truncated data and goes on with grey rows: a record
// must never come back as garbage, so a warning fails the decode too.
void on_message(j_common_ptr cinfo, int level) {
  if (level < 0) on_error(cinfo);
}

// Plain C control flow only between setjmp and longjmp: nothing here has a destructor.
// Returns nullptr on success, else the error text (held in `err`).
const char* decode(const uint8_t* data, size_t size, int height, int width, uint8_t* out,
                   ErrorManager* err, int* got_h, int* got_w, int* got_c) {
  jpeg_decompress_struct cinfo;
  cinfo.err = jpeg_std_error(&err->pub);
  err->pub.error_exit = on_error;
  err->pub.emit_message = on_message;
  err->message[0] = '\0';
  if (setjmp(err->jump)) {
    jpeg_destroy_decompress(&cinfo);
    return err->message;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(&cinfo, TRUE);
  // The size and colour components the JPEG's own header claims, checked before
  // jpeg_start_decompress allocates for them (a whole-image buffer for a progressive JPEG).
  *got_h = int(cinfo.image_height);
  *got_w = int(cinfo.image_width);
  *got_c = cinfo.num_components;
  if (*got_h != height || *got_w != width || *got_c != 3) {
    jpeg_destroy_decompress(&cinfo);
    return "";
  }
  cinfo.out_color_space = JCS_RGB;
  cinfo.dct_method = JDCT_ISLOW;  // Pillow's default, so Python and C++ decode alike
  jpeg_start_decompress(&cinfo);
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row = out + size_t(cinfo.output_scanline) * width * 3;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return nullptr;
}

}  // namespace

void decode_jpeg(const uint8_t* data, size_t size, int height, int width, uint8_t* out,
                 const std::string& where) {
  ErrorManager err;
  int got_h = 0, got_w = 0, got_c = 0;
  const char* failure = decode(data, size, height, width, out, &err, &got_h, &got_w, &got_c);
  if (!failure) return;
  if (*failure) throw CorruptRecord(where + ": JPEG does not decode: " + failure);
  // The message matches t2i_fast/data/format.py's.
  throw CorruptRecord(where + ": JPEG is " + std::to_string(got_h) + "x" + std::to_string(got_w) +
                      " with " + std::to_string(got_c) + " colour components, the dataset " +
                      "stores " + std::to_string(height) + "x" + std::to_string(width) + " RGB");
}

}  // namespace t2i
