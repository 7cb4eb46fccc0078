#include "loader.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "errors.h"
#include "jpeg.h"

namespace t2i {
namespace {

size_t align64(size_t n) { return (n + 63) & ~size_t(63); }

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

// Crops size x size at (y0, x0) from an HWC uint8 image of width `width`, mirrors it when
// `flip`, maps every value through `lut` and writes NHWC or NCHW.
template <typename T>
void crop_convert(const uint8_t* src, int width, int y0, int x0, int size, bool flip, bool nhwc,
                  const T* lut, T* out) {
  const size_t plane = size_t(size) * size;
  for (int y = 0; y < size; ++y) {
    const uint8_t* row = src + (size_t(y0 + y) * width + x0) * 3;
    if (nhwc) {
      T* o = out + size_t(y) * size * 3;
      if (!flip) {
        for (int i = 0; i < size * 3; ++i) o[i] = lut[row[i]];
      } else {
        for (int x = 0; x < size; ++x) {
          const uint8_t* p = row + (size - 1 - x) * 3;
          o[x * 3] = lut[p[0]];
          o[x * 3 + 1] = lut[p[1]];
          o[x * 3 + 2] = lut[p[2]];
        }
      }
    } else {
      T* r = out + size_t(y) * size;
      T* g = r + plane;
      T* b = g + plane;
      for (int x = 0; x < size; ++x) {
        const uint8_t* p = row + (flip ? size - 1 - x : x) * 3;
        r[x] = lut[p[0]];
        g[x] = lut[p[1]];
        b[x] = lut[p[2]];
      }
    }
  }
}

// The uint8 case with the identity table: rows are copied, not looked up.
void crop_copy(const uint8_t* src, int width, int y0, int x0, int size, bool flip, bool nhwc,
               uint8_t* out) {
  if (!nhwc) {
    static uint8_t identity[256];
    if (identity[255] != 255)
      for (int i = 0; i < 256; ++i) identity[i] = uint8_t(i);
    crop_convert(src, width, y0, x0, size, flip, nhwc, identity, out);
    return;
  }
  for (int y = 0; y < size; ++y) {
    const uint8_t* row = src + (size_t(y0 + y) * width + x0) * 3;
    uint8_t* o = out + size_t(y) * size * 3;
    if (!flip) {
      std::memcpy(o, row, size_t(size) * 3);
      continue;
    }
    // Mirrored: pixels move as 4-byte words whose spare byte the next pixel overwrites; the
    // two end pixels move as 3 bytes so that no read or write leaves the row.
    std::memcpy(o, row + (size - 1) * 3, 3);
    for (int x = 1; x < size - 1; ++x) {
      uint32_t pixel;
      std::memcpy(&pixel, row + (size - 1 - x) * 3, 4);
      std::memcpy(o + x * 3, &pixel, 4);
    }
    if (size > 1) std::memcpy(o + (size - 1) * 3, row, 3);
  }
}

// One-hot [70, length] over a region that holds the one-hot of `previous` (all zero for a new
// slot): clearing the old ones and setting the new ones touches 2 x length elements instead of
// the 70 x length a full clear would. Indices are at most 70: parse_record refuses others.
template <typename T>
void onehot(const uint8_t* chars, uint8_t* previous, int length, T one, T* out) {
  for (int l = 0; l < length; ++l) {
    if (previous[l]) out[size_t(previous[l] - 1) * length + l] = T(0);
    if (chars[l]) out[size_t(chars[l] - 1) * length + l] = one;
    previous[l] = chars[l];
  }
}

}  // namespace

SlotLayout slot_layout(const SlotGeometry& g) {
  require(g.batch_size >= 1, "batch_size must be at least 1");
  require(g.batch_size <= (int64_t(1) << 24), "batch_size must be at most 2^24");
  require(g.size >= 1 && g.size <= 65535, "size must be in [1, 65535]");
  require(g.captions_per_sample >= 1 && g.captions_per_sample <= 255,
          "captions_per_sample must be in [1, 255]");
  require(g.doc_length >= 1 && g.doc_length <= 65535, "doc_length must be in [1, 65535]");
  require(g.elem_bytes == 1 || g.elem_bytes == 2 || g.elem_bytes == 4,
          "elem_bytes must be 1, 2 or 4");
  // With these bounds no field reaches 2^60 bytes: the sizes below cannot overflow.
  const int64_t B = g.batch_size, k = g.captions_per_sample, S = g.size, L = g.doc_length;
  const std::vector<int64_t> image = g.nhwc ? std::vector<int64_t>{B, S, S, 3}
                                            : std::vector<int64_t>{B, 3, S, S};
  const bool onehot = g.captions == CaptionFormat::kOnehot;
  std::vector<int64_t> captions{B, k, L};
  SlotDtype caption_dtype = SlotDtype::kUint8;
  if (onehot) {
    captions = {B, k, kAlphabetSize, L};
    caption_dtype = SlotDtype::kPixel;
  } else if (g.captions == CaptionFormat::kIds) {
    captions = {B, k};
    caption_dtype = SlotDtype::kInt64;
  }
  SlotLayout layout{};
  auto& f = layout.fields;  // filled by id, laid out in id order below
  f[kImages] = {"images", SlotDtype::kPixel, image, 0, 0};
  f[kWrongImages] = {"wrong_images", SlotDtype::kPixel, image, 0, 0};
  f[kCaptions] = {"captions", caption_dtype, captions, 0, 0};
  f[kCaptionIds] = {"caption_ids", SlotDtype::kInt64, {B, k}, 0, 0};
  f[kClassIds] = {"class_ids", SlotDtype::kInt64, {B}, 0, 0};
  f[kWrongClassIds] = {"wrong_class_ids", SlotDtype::kInt64, {B}, 0, 0};
  f[kIndices] = {"indices", SlotDtype::kInt64, {B}, 0, 0};
  f[kWrongIndices] = {"wrong_indices", SlotDtype::kInt64, {B}, 0, 0};
  f[kOnehotShadow] = {"onehot_shadow", SlotDtype::kUint8, {B, k, onehot ? L : 0}, 0, 0};
  size_t at = 0;
  for (SlotField& field : layout.fields) {
    size_t bytes = field.dtype == SlotDtype::kPixel   ? size_t(g.elem_bytes)
                   : field.dtype == SlotDtype::kInt64 ? 8
                                                      : 1;
    for (int64_t n : field.shape) bytes *= size_t(n);
    field.offset = at;
    field.bytes = bytes;
    at = align64(at + bytes);
  }
  layout.bytes = at;
  return layout;
}

Loader::Loader(const std::string& path, const DatasetSpec& spec, LoaderOptions options)
    : opt_(std::move(options)),
      store_(path, spec),
      class_ids_([&] {
        std::vector<int64_t> ids(store_.size());
        for (int64_t i = 0; i < store_.size(); ++i) ids[i] = store_[i].class_id;
        return ids;
      }()),
      first_caption_([&] {
        std::vector<int64_t> first(store_.size() + 1, 0);
        for (int64_t i = 0; i < store_.size(); ++i) first[i + 1] = first[i] + store_[i].n_captions;
        return first;
      }()),
      picker_(class_ids_) {
  const int64_t count = spec.count;
  require(count >= 2, path + ": the loader needs at least 2 records (mismatched images)");
  // Every record has the metadata's image size and document length (parse_record checks).
  stored_h_ = spec.height;
  stored_w_ = spec.width;
  doc_length_ = spec.doc_length;
  require(opt_.size >= 1 && opt_.size <= stored_h_ && opt_.size <= stored_w_,
          "size must be in [1, " + std::to_string(std::min(stored_h_, stored_w_)) +
              "] (the stored image size)");
  SlotGeometry geometry;
  geometry.batch_size = opt_.batch_size;
  geometry.size = opt_.size;
  geometry.captions_per_sample = opt_.captions_per_sample;
  geometry.doc_length = doc_length_;
  geometry.captions = opt_.captions;
  geometry.elem_bytes = opt_.elem_bytes;
  geometry.nhwc = opt_.nhwc;
  layout_ = slot_layout(geometry);
  require(opt_.lut.size() == size_t(256 * opt_.elem_bytes), "lut must hold 256 * elem_bytes bytes");
  require(opt_.one.size() == size_t(opt_.elem_bytes), "one must hold elem_bytes bytes");
  require(opt_.world_size >= 1 && opt_.rank >= 0 && opt_.rank < opt_.world_size,
          "rank must be in [0, world_size)");
  require(opt_.num_threads >= 1 && opt_.num_threads <= 256, "num_threads must be in [1, 256]");

  identity_lut_ = opt_.elem_bytes == 1;
  for (int i = 0; i < 256 && identity_lut_; ++i) identity_lut_ = opt_.lut[i] == i;

  const int64_t per_rank = opt_.drop_last ? count / opt_.world_size
                                          : (count - opt_.rank + opt_.world_size - 1) / opt_.world_size;
  num_batches_ = opt_.drop_last ? per_rank / opt_.batch_size
                                : (per_rank + opt_.batch_size - 1) / opt_.batch_size;
  require(num_batches_ >= 1, "batch_size " + std::to_string(opt_.batch_size) +
                                 " leaves no full batch of " + std::to_string(per_rank) +
                                 " records per rank (lower it or pass drop_last=False)");

  verified_.reset(new std::atomic<uint8_t>[store_.size()]);
  for (int64_t i = 0; i < store_.size(); ++i) verified_[i].store(opt_.verify ? 0 : 1);
  for (int t = 0; t < opt_.num_threads; ++t) threads_.emplace_back([this] { work(); });
}

Loader::~Loader() { close(); }

void Loader::close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  ready_cv_.notify_all();
  // A close() that returned while another one was still joining would let the destructor
  // free joinable threads (std::terminate) or the slots' owner free memory they still fill.
  std::lock_guard<std::mutex> joining(join_mu_);
  for (auto& t : threads_) t.join();
  threads_.clear();
}

int Loader::num_slots() {
  std::lock_guard<std::mutex> lock(mu_);
  return int(slots_.size());
}

int Loader::add_slot(uint8_t* base) {
  require(base != nullptr, "slot buffer is null");
  // The one-hot writer clears only what it set before (the shadow records it).
  std::memset(base, 0, layout_.bytes);
  std::lock_guard<std::mutex> lock(mu_);
  slots_.push_back(base);
  free_slots_.push_back(int(slots_.size()) - 1);
  work_cv_.notify_one();
  return int(slots_.size()) - 1;
}

int Loader::num_leased() {
  std::lock_guard<std::mutex> lock(mu_);
  return leased_;
}

uint8_t* Loader::slot_data(int slot) {
  std::lock_guard<std::mutex> lock(mu_);
  require(slot >= 0 && slot < int(slots_.size()), "slot out of range");
  return slots_[slot];
}

void Loader::release(int slot) noexcept {
  {
    std::lock_guard<std::mutex> lock(mu_);
    --leased_;
    free_slots_.push_back(slot);
  }
  work_cv_.notify_one();
}

void Loader::start_epoch(uint64_t epoch, int64_t first_batch) {
  require(first_batch >= 0 && first_batch <= num_batches_,
          "first_batch must be in [0, " + std::to_string(num_batches_) + "]");
  auto plan = std::make_shared<Plan>();
  plan->epoch = epoch;
  const std::vector<int64_t> order = epoch_order(opt_.seed, epoch, store_.size());
  for (size_t i = opt_.rank; i < order.size(); i += opt_.world_size) plan->records.push_back(order[i]);
  if (opt_.drop_last) plan->records.resize(order.size() / opt_.world_size);
  const uint64_t s = opt_.seed;
  plan->key_crop_y = stream_key(s, epoch, kCropY);
  plan->key_crop_x = stream_key(s, epoch, kCropX);
  plan->key_flip = stream_key(s, epoch, kFlip);
  plan->key_caption = stream_key(s, epoch, kCaption);
  plan->key_wrong = stream_key(s, epoch, kWrong);
  plan->key_wrong_crop_y = stream_key(s, epoch, kWrongCropY);
  plan->key_wrong_crop_x = stream_key(s, epoch, kWrongCropX);
  plan->key_wrong_flip = stream_key(s, epoch, kWrongFlip);

  std::unique_lock<std::mutex> lock(mu_);
  require(!stopping_, "the loader is closed");
  ++generation_;
  // No plan, no new work: batches of the previous epoch still being filled finish into their
  // slots and are dropped, and no worker starts another while this waits for them.
  plan_.reset();
  idle_cv_.wait(lock, [&] { return in_flight_ == 0; });
  for (auto& [batch, filled] : filled_) free_slots_.push_back(filled.slot);
  filled_.clear();
  plan_ = std::move(plan);
  next_fill_ = next_consume_ = first_batch;
  lock.unlock();
  work_cv_.notify_all();
}

std::optional<ReadyBatch> Loader::next() {
  std::unique_lock<std::mutex> lock(mu_);
  require(plan_ != nullptr, "start_epoch was not called");
  if (next_consume_ >= num_batches_) return std::nullopt;
  auto stuck = [&] { return free_slots_.empty() && in_flight_ == 0 && !filled_.count(next_consume_); };
  ready_cv_.wait(lock, [&] { return stopping_ || filled_.count(next_consume_) || stuck(); });
  require(!stopping_, "the loader is closed");
  if (stuck()) throw std::runtime_error("every batch slot is held by the caller; add a slot first");
  auto node = filled_.extract(next_consume_);
  const int64_t batch = next_consume_++;
  if (node.mapped().error) {
    free_slots_.push_back(node.mapped().slot);
    lock.unlock();
    work_cv_.notify_one();
    std::rethrow_exception(node.mapped().error);
  }
  const int64_t begin = batch * opt_.batch_size;
  const int64_t size = std::min<int64_t>(opt_.batch_size, int64_t(plan_->records.size()) - begin);
  ++leased_;
  return ReadyBatch{node.mapped().slot, batch, size};
}

void Loader::work() {
  std::vector<uint8_t> scratch;  // one decoded JPEG
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    work_cv_.wait(lock, [&] {
      return stopping_ || (plan_ && next_fill_ < num_batches_ && !free_slots_.empty());
    });
    if (stopping_) return;
    const int64_t batch = next_fill_++;
    const int slot = free_slots_.back();
    free_slots_.pop_back();
    const uint64_t generation = generation_;
    std::shared_ptr<const Plan> plan = plan_;
    uint8_t* base = slots_[slot];
    ++in_flight_;
    lock.unlock();

    std::exception_ptr error;
    try {
      fill(*plan, batch, base, scratch);
    } catch (...) {
      error = std::current_exception();
    }

    lock.lock();
    if (--in_flight_ == 0) idle_cv_.notify_all();
    if (generation != generation_) {
      free_slots_.push_back(slot);
      work_cv_.notify_one();
      continue;
    }
    filled_.emplace(batch, Filled{slot, error});
    ready_cv_.notify_all();
  }
}

void Loader::ensure_verified(int64_t record) {
  if (verified_[record].load(std::memory_order_acquire)) return;
  verify_crc(store_[record], store_.where(record));
  verified_[record].store(1, std::memory_order_release);
}

void Loader::write_image(int64_t record, int64_t anchor, uint64_t key_y, uint64_t key_x,
                         uint64_t key_flip, uint8_t* out, std::vector<uint8_t>& scratch) {
  ensure_verified(record);
  const RecordView& rec = store_[record];
  const uint64_t r = uint64_t(anchor);
  int y0 = (stored_h_ - opt_.size) / 2, x0 = (stored_w_ - opt_.size) / 2;
  if (opt_.random_crop) {
    y0 = int(uniform(draw(key_y, r), uint64_t(stored_h_ - opt_.size + 1)));
    x0 = int(uniform(draw(key_x, r), uint64_t(stored_w_ - opt_.size + 1)));
  }
  const bool flip = opt_.flip && (draw(key_flip, r) >> 63);
  const uint8_t* src = rec.pixels;
  if (rec.encoding == Encoding::kJpeg) {
    scratch.resize(size_t(stored_h_) * stored_w_ * 3);
    decode_jpeg(rec.pixels, rec.pixel_bytes, stored_h_, stored_w_, scratch.data(),
                store_.where(record));
    src = scratch.data();
  }
  switch (opt_.elem_bytes) {
    case 1:
      if (identity_lut_)
        crop_copy(src, stored_w_, y0, x0, opt_.size, flip, opt_.nhwc, out);
      else
        crop_convert(src, stored_w_, y0, x0, opt_.size, flip, opt_.nhwc, opt_.lut.data(), out);
      break;
    case 2:
      crop_convert(src, stored_w_, y0, x0, opt_.size, flip, opt_.nhwc,
                   reinterpret_cast<const uint16_t*>(opt_.lut.data()),
                   reinterpret_cast<uint16_t*>(out));
      break;
    default:
      crop_convert(src, stored_w_, y0, x0, opt_.size, flip, opt_.nhwc,
                   reinterpret_cast<const uint32_t*>(opt_.lut.data()),
                   reinterpret_cast<uint32_t*>(out));
  }
}

void Loader::write_captions(const RecordView& rec, const int64_t* ids, uint8_t* out,
                            uint8_t* previous) const {
  const int L = doc_length_;
  for (int j = 0; j < opt_.captions_per_sample; ++j) {
    const uint8_t* chars = rec.chars + ids[j] * L;
    if (opt_.captions == CaptionFormat::kIndices) {
      std::memcpy(out + size_t(j) * L, chars, L);
      continue;
    }
    uint8_t* o = out + size_t(j) * kAlphabetSize * L * opt_.elem_bytes;
    uint8_t* p = previous + size_t(j) * L;
    if (opt_.elem_bytes == 1) {
      onehot(chars, p, L, opt_.one[0], o);
    } else if (opt_.elem_bytes == 2) {
      uint16_t one;
      std::memcpy(&one, opt_.one.data(), 2);
      onehot(chars, p, L, one, reinterpret_cast<uint16_t*>(o));
    } else {
      uint32_t one;
      std::memcpy(&one, opt_.one.data(), 4);
      onehot(chars, p, L, one, reinterpret_cast<uint32_t*>(o));
    }
  }
}

void Loader::fill(const Plan& plan, int64_t batch, uint8_t* base, std::vector<uint8_t>& scratch) {
  const int64_t begin = batch * opt_.batch_size;
  const int64_t end = std::min<int64_t>(begin + opt_.batch_size, int64_t(plan.records.size()));
  const int k = opt_.captions_per_sample;
  // Per sample: a field's bytes over the batch size.
  const size_t image_bytes = layout_[kImages].bytes / opt_.batch_size;
  const size_t caption_bytes = layout_[kCaptions].bytes / opt_.batch_size;
  auto field = [&](SlotFieldId id) { return base + layout_[id].offset; };
  auto* caption_ids = reinterpret_cast<int64_t*>(field(kCaptionIds));
  auto* class_ids = reinterpret_cast<int64_t*>(field(kClassIds));
  auto* wrong_class_ids = reinterpret_cast<int64_t*>(field(kWrongClassIds));
  auto* indices = reinterpret_cast<int64_t*>(field(kIndices));
  auto* wrong_indices = reinterpret_cast<int64_t*>(field(kWrongIndices));
  for (int64_t i = begin; i < end; ++i) {
    const int64_t s = i - begin;
    const int64_t r = plan.records[i];
    const int64_t w = picker_(plan.key_wrong, r);
    write_image(r, r, plan.key_crop_y, plan.key_crop_x, plan.key_flip,
                field(kImages) + s * image_bytes, scratch);
    write_image(w, r, plan.key_wrong_crop_y, plan.key_wrong_crop_x, plan.key_wrong_flip,
                field(kWrongImages) + s * image_bytes, scratch);
    const RecordView& rec = store_[r];
    int64_t* ids = caption_ids + s * k;
    caption_choice(plan.key_caption, r, rec.n_captions, k, ids);
    if (opt_.captions == CaptionFormat::kIds) {
      auto* global = reinterpret_cast<int64_t*>(field(kCaptions) + s * caption_bytes);
      for (int j = 0; j < k; ++j) global[j] = first_caption_[r] + ids[j];
    } else {
      write_captions(rec, ids, field(kCaptions) + s * caption_bytes,
                     field(kOnehotShadow) + s * k * doc_length_);
    }
    class_ids[s] = rec.class_id;
    wrong_class_ids[s] = store_[w].class_id;
    indices[s] = r;
    wrong_indices[s] = w;
  }
}

}  // namespace t2i
