// The batch loader: worker threads fill a ring of batch slots ahead of the consumer.
//
// The slots' memory belongs to the caller (pinned host memory when CUDA is available), handed
// in once with add_slot; the loader never allocates per batch. Batch b of an epoch always
// holds the same samples and augmentations (see sampling.h), whichever thread fills it.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "lmdb_store.h"
#include "sampling.h"

namespace t2i {

// What a sample's k captions are delivered as: character indices uint8 [k, L], their one-hot
// [k, 70, L] in the pixel type, or global caption ids int64 [k] (a record's first caption id
// plus the caption's index in it, records in key order) for a table of precomputed embeddings.
enum class CaptionFormat { kIndices, kOnehot, kIds };

struct LoaderOptions {
  int64_t batch_size = 64;
  int size = 64;                 // training crop, square
  int captions_per_sample = 4;   // k captions per sample
  CaptionFormat captions = CaptionFormat::kIndices;
  int elem_bytes = 1;            // bytes per image / one-hot element: 1, 2 or 4
  std::vector<uint8_t> lut;      // 256 * elem_bytes: each pixel value's output bits
  std::vector<uint8_t> one;      // elem_bytes: the bits of 1 (one-hot)
  bool nhwc = true;
  bool random_crop = true;
  bool flip = true;
  uint64_t seed = 0;
  int rank = 0, world_size = 1;
  bool drop_last = true;
  int num_threads = 2;
  bool verify = true;            // check each record's CRC-32 the first time it is read
};

// What a slot field's elements are: the caller's pixel type (elem_bytes wide, with the bits
// that `lut` and `one` give), character indices, or 64-bit integers.
enum class SlotDtype { kPixel, kUint8, kInt64 };

// The fields of a slot, in the order they lie in it.
enum SlotFieldId {
  kImages,
  kWrongImages,
  kCaptions,
  kCaptionIds,
  kClassIds,
  kWrongClassIds,
  kIndices,
  kWrongIndices,
  kOnehotShadow,  // the character indices whose one-hot the slot holds (empty without one-hot)
  kNumSlotFields
};

struct SlotField {
  const char* name;
  SlotDtype dtype;
  std::vector<int64_t> shape;  // row-major, as stored: images [B, S, S, 3] or [B, 3, S, S]
  size_t offset;               // from the slot's start; a multiple of 64
  size_t bytes;
};

struct SlotLayout {
  std::array<SlotField, kNumSlotFields> fields;
  size_t bytes;  // the whole slot
  const SlotField& operator[](SlotFieldId id) const { return fields[id]; }
};

// What a slot's layout depends on.
struct SlotGeometry {
  int64_t batch_size = 64;
  int size = 64;
  int captions_per_sample = 4;
  int doc_length = 201;
  CaptionFormat captions = CaptionFormat::kIndices;
  int elem_bytes = 1;
  bool nhwc = true;
};

// The one definition of a slot's layout: the loader writes by it and the Python views of a
// batch are built from it (bindings.cpp exports it). Throws std::invalid_argument naming the
// field of `geometry` that is out of range.
SlotLayout slot_layout(const SlotGeometry& geometry);

struct ReadyBatch {
  int slot;
  int64_t batch;
  int64_t size;  // samples in it: batch_size except for a last partial batch
};

class Loader {
 public:
  // `spec` holds the dataset's metadata: every record is checked against it when it opens.
  Loader(const std::string& path, const DatasetSpec& spec, LoaderOptions options);
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  const SlotLayout& layout() const { return layout_; }
  int64_t num_batches() const { return num_batches_; }
  int64_t num_records() const { return store_.size(); }
  int64_t num_captions() const { return first_caption_.back(); }  // captions of all records
  int num_slots();
  int num_leased();  // slots handed to the consumer and not yet released
  uint8_t* slot_data(int slot);

  int add_slot(uint8_t* base);
  // Drops what is queued or in flight and starts filling `epoch` from batch `first_batch`.
  void start_epoch(uint64_t epoch, int64_t first_batch);
  // Blocks until the next batch in order is full; nullopt at the end of the epoch. Rethrows
  // (once) the error that filling that batch met.
  std::optional<ReadyBatch> next();
  void release(int slot) noexcept;
  // Stops the threads and returns once they are joined, whichever call (of any thread, the
  // destructor's included) comes first.
  void close();

 private:
  struct Plan {
    uint64_t epoch;
    std::vector<int64_t> records;  // this rank's samples, in order
    uint64_t key_crop_y, key_crop_x, key_flip, key_caption, key_wrong, key_wrong_crop_y,
        key_wrong_crop_x, key_wrong_flip;
  };
  struct Filled {
    int slot;
    std::exception_ptr error;
  };

  void work();
  void fill(const Plan& plan, int64_t batch, uint8_t* base, std::vector<uint8_t>& scratch);
  // Crops and flips record `record` with the choices drawn for sample `anchor` (a mismatched
  // image takes its augmentation from the sample it is paired with).
  void write_image(int64_t record, int64_t anchor, uint64_t key_y, uint64_t key_x,
                   uint64_t key_flip, uint8_t* out, std::vector<uint8_t>& scratch);
  void write_captions(const RecordView& rec, const int64_t* ids, uint8_t* out,
                      uint8_t* previous) const;
  void ensure_verified(int64_t record);

  const LoaderOptions opt_;
  RecordStore store_;
  std::vector<int64_t> class_ids_;
  std::vector<int64_t> first_caption_;  // [records + 1]: prefix sums of the caption counts
  WrongImagePicker picker_;
  SlotLayout layout_{};
  int64_t num_batches_ = 0;
  int stored_h_ = 0, stored_w_ = 0, doc_length_ = 0;
  bool identity_lut_ = false;
  std::unique_ptr<std::atomic<uint8_t>[]> verified_;

  std::mutex mu_;
  std::condition_variable work_cv_, ready_cv_, idle_cv_;
  std::vector<uint8_t*> slots_;
  std::vector<int> free_slots_;
  std::shared_ptr<const Plan> plan_;
  uint64_t generation_ = 0;
  int64_t next_fill_ = 0, next_consume_ = 0;
  int in_flight_ = 0;
  int leased_ = 0;
  bool stopping_ = false;
  std::map<int64_t, Filled> filled_;
  std::mutex join_mu_;  // held while the threads are joined: a second close() waits for it
  std::vector<std::thread> threads_;
};

}  // namespace t2i
