// Exceptions the core throws; bindings.cpp maps them to Python exception classes.
#pragma once

#include <stdexcept>
#include <string>

namespace t2i {

// A record whose bytes fail their checks (bad header, truncated, checksum mismatch, a JPEG
// that does not decode). The message names the dataset file and the record key.
struct CorruptRecord : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// An LMDB call that returned an error status; the message names the file, the call and the key.
struct LmdbError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace t2i
