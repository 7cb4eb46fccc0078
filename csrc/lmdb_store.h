// A read-only, memory-mapped view of a dataset's records.
#pragma once

#include <lmdb.h>

#include <cstdint>
#include <string>
#include <vector>

#include "record.h"

namespace t2i {

class RecordStore {
 public:
  // Opens `path` (an LMDB directory) read-only without a lock file, refuses a data.mdb cut
  // short (LMDB maps the file: reading past its end is a SIGBUS), keeps one read transaction
  // open for the store's life (so record pointers stay valid) and parses every record header
  // against `spec`: spec.count records under keys 00000000... and the metadata record.
  RecordStore(const std::string& path, const DatasetSpec& spec);
  ~RecordStore();
  RecordStore(const RecordStore&) = delete;
  RecordStore& operator=(const RecordStore&) = delete;

  int64_t size() const { return int64_t(records_.size()); }
  const RecordView& operator[](int64_t i) const { return records_[i]; }
  const std::string& path() const { return path_; }
  std::string where(int64_t i) const;  // "<path>: record '00000042'", for error messages

 private:
  std::string path_;
  MDB_env* env_ = nullptr;
  MDB_txn* txn_ = nullptr;
  std::vector<RecordView> records_;
};

std::string record_key(int64_t index);

}  // namespace t2i
