#include "lmdb_store.h"

#include <sys/stat.h>

#include <cstdio>

#include "errors.h"

namespace t2i {
namespace {

void check(int rc, const std::string& path, const char* call, const std::string& key = "") {
  if (rc == MDB_SUCCESS) return;
  std::string msg = path + ": " + call;
  if (!key.empty()) msg += " (key '" + key + "')";
  throw LmdbError(msg + ": " + mdb_strerror(rc));
}

// The environment's last used page must lie inside the file: a copy cut short maps pages that
// are not there, and touching one kills the process with SIGBUS. The message matches
// t2i_fast/data/format.py's.
void check_not_truncated(MDB_env* env, const std::string& path) {
  MDB_envinfo info;
  MDB_stat st;
  check(mdb_env_info(env, &info), path, "mdb_env_info");
  check(mdb_env_stat(env, &st), path, "mdb_env_stat");
  const std::string file = path + "/data.mdb";
  struct stat fs;
  if (::stat(file.c_str(), &fs) != 0) throw LmdbError(file + ": cannot stat");
  const uint64_t need = (uint64_t(info.me_last_pgno) + 1) * st.ms_psize;
  if (uint64_t(fs.st_size) < need)
    throw CorruptRecord(file + ": truncated (" + std::to_string(fs.st_size) + " bytes, its " +
                        "last page ends at byte " + std::to_string(need) + "); copy the dataset " +
                        "again");
}

}  // namespace

std::string record_key(int64_t index) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%08lld", static_cast<long long>(index));
  return buf;
}

std::string RecordStore::where(int64_t i) const { return path_ + ": record '" + record_key(i) + "'"; }

RecordStore::RecordStore(const std::string& path, const DatasetSpec& spec) : path_(path) {
  check_spec(spec);
  const int64_t count = spec.count;
  try {
    check(mdb_env_create(&env_), path, "mdb_env_create");
    // Worker threads share the one read transaction's pointers; NOTLS ties no reader slot to a
    // thread, NOLOCK needs no lock file (datasets on read-only media work).
    check(mdb_env_open(env_, path.c_str(), MDB_RDONLY | MDB_NOLOCK | MDB_NOTLS, 0644), path,
          "mdb_env_open");
    check_not_truncated(env_, path);
    check(mdb_txn_begin(env_, nullptr, MDB_RDONLY, &txn_), path, "mdb_txn_begin");
    MDB_dbi dbi;
    check(mdb_dbi_open(txn_, nullptr, 0, &dbi), path, "mdb_dbi_open");
    // Before reserving room for `count` records: a forged count must not allocate terabytes.
    MDB_stat st;
    check(mdb_stat(txn_, dbi, &st), path, "mdb_stat");
    if (uint64_t(count) + 1 != st.ms_entries)
      throw CorruptRecord(path + ": metadata record '__meta__' says " + std::to_string(count) +
                          " records, the LMDB holds " +
                          std::to_string(st.ms_entries ? st.ms_entries - 1 : 0) +
                          " besides it");
    records_.reserve(count);
    for (int64_t i = 0; i < count; ++i) {
      std::string key = record_key(i);
      MDB_val k{key.size(), key.data()}, v;
      const int rc = mdb_get(txn_, dbi, &k, &v);
      if (rc == MDB_NOTFOUND) throw CorruptRecord(where(i) + ": missing (the metadata promises " +
                                                  std::to_string(count) + " records)");
      check(rc, path, "mdb_get", key);
      records_.push_back(
          parse_record(static_cast<const uint8_t*>(v.mv_data), v.mv_size, spec, where(i)));
    }
  } catch (...) {
    if (txn_) mdb_txn_abort(txn_);
    if (env_) mdb_env_close(env_);
    throw;
  }
}

RecordStore::~RecordStore() {
  mdb_txn_abort(txn_);
  mdb_env_close(env_);
}

}  // namespace t2i
