// The sampling plan of t2i_fast/data/sampling.py, reproduced bit for bit: every random choice
// is a pure function of (seed, epoch, stream, record, j) through SplitMix64's finaliser.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace t2i {

enum Stream : uint64_t {
  kPermutation = 1, kCropY, kCropX, kFlip, kCaption, kWrong, kWrongCropY, kWrongCropX, kWrongFlip,
};

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline uint64_t stream_key(uint64_t seed, uint64_t epoch, uint64_t stream) {
  uint64_t h = mix64(seed + 0x9E3779B97F4A7C15ull);
  h = mix64(h ^ epoch);
  return mix64(h ^ stream);
}

inline uint64_t draw(uint64_t key, uint64_t index, uint64_t j = 0) {
  return mix64(mix64(key ^ index) + j);
}

// [0, n) for n < 2^32.
inline uint64_t uniform(uint64_t bits, uint64_t n) { return ((bits >> 32) * n) >> 32; }

inline std::vector<int64_t> epoch_order(uint64_t seed, uint64_t epoch, int64_t count) {
  const uint64_t key = stream_key(seed, epoch, kPermutation);
  std::vector<std::pair<uint64_t, int64_t>> keyed(count);
  for (int64_t i = 0; i < count; ++i) keyed[i] = {draw(key, uint64_t(i)), i};
  std::sort(keyed.begin(), keyed.end());  // ties broken by index, as numpy's stable argsort
  std::vector<int64_t> order(count);
  for (int64_t i = 0; i < count; ++i) order[i] = keyed[i].second;
  return order;
}

// A record of another class for each record (any other record when there is one class).
class WrongImagePicker {
 public:
  explicit WrongImagePicker(const std::vector<int64_t>& class_ids) : class_ids_(class_ids) {
    const int64_t n = int64_t(class_ids.size());
    const int64_t n_classes = n ? *std::max_element(class_ids.begin(), class_ids.end()) + 1 : 0;
    size_.assign(n_classes, 0);
    for (int64_t c : class_ids) ++size_[c];
    start_.assign(n_classes, 0);
    for (int64_t c = 1; c < n_classes; ++c) start_[c] = start_[c - 1] + size_[c - 1];
    by_class_.resize(n);
    std::iota(by_class_.begin(), by_class_.end(), 0);
    std::stable_sort(by_class_.begin(), by_class_.end(),
                     [&](int64_t a, int64_t b) { return class_ids[a] < class_ids[b]; });
    single_class_ = std::count_if(size_.begin(), size_.end(), [](int64_t s) { return s > 0; }) < 2;
  }

  int64_t operator()(uint64_t key, int64_t record) const {
    const uint64_t bits = draw(key, uint64_t(record));
    const int64_t n = int64_t(class_ids_.size());
    if (single_class_) {
      const int64_t t = int64_t(uniform(bits, uint64_t(n - 1)));
      return t < record ? t : t + 1;
    }
    const int64_t c = class_ids_[record];
    const int64_t t = int64_t(uniform(bits, uint64_t(n - size_[c])));
    return by_class_[t < start_[c] ? t : t + size_[c]];
  }

 private:
  std::vector<int64_t> class_ids_, by_class_, start_, size_;
  bool single_class_ = true;
};

// k caption ids of a record with `available` captions: distinct while k <= available (a
// partial Fisher-Yates shuffle), then drawn with replacement.
inline void caption_choice(uint64_t key, int64_t record, int available, int k, int64_t* out) {
  int ids[256];  // records hold at most 255 captions (checked when the dataset is opened)
  for (int i = 0; i < available; ++i) ids[i] = i;
  for (int j = 0; j < k; ++j) {
    const uint64_t bits = draw(key, uint64_t(record), uint64_t(j));
    if (j < available) {
      const int t = j + int(uniform(bits, uint64_t(available - j)));
      std::swap(ids[j], ids[t]);
      out[j] = ids[j];
    } else {
      out[j] = int64_t(uniform(bits, uint64_t(available)));
    }
  }
}

}  // namespace t2i
