// Clip preprocessing (see preprocess.h for the pipeline and why it is computed this way).
#include "preprocess.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define EGOVLP_F16C_DISPATCH 1
#endif

namespace egovlp {

// Sizes past this are a caller bug (a 16k x 16k float plane is 1 GiB), not a video: refuse them before allocating.
constexpr int64_t kMaxSide = 16384;
// Output rows of one frame are split into bands only when there are fewer frames than threads x this factor, so
// each thread gets a few items to balance; every band recomputes up to two intermediate rows at its top edge.
constexpr int64_t kItemsPerThread = 2;
constexpr int64_t kMinBandRows = 16;
// More workers than this is a mistaken argument, not a machine: each one costs a scratch buffer and a thread.
constexpr int64_t kMaxThreads = 256;

AxisMap bilinear_axis(int64_t in_size, int64_t out_size, int64_t begin, int64_t count) {
  AxisMap m;
  m.i0.resize(count);
  m.i1.resize(count);
  m.w0.resize(count);
  m.w1.resize(count);
  // The ratio and source coordinate are float arithmetic in torch (opmath_t of float is float), and torch's CPU
  // kernels run the AVX2 build of UpSampleKernel.cpp, where GCC contracts `scale * (dst + 0.5) - 0.5` into one
  // fused multiply-add. Near source coordinate 255 one float ulp is 3e-5, so the unfused rounding moves the weight
  // by that much and the output by up to 1e-4 after normalisation. std::fma reproduces the fused rounding on every
  // machine (in software where there is no FMA unit: it runs O(size) times).
  const float ratio = static_cast<float>(in_size) / static_cast<float>(out_size);
  for (int64_t k = 0; k < count; ++k) {
    const int64_t dst = begin + k;
    if (in_size == out_size) {  // torch copies: weights exactly (1, 0), so the value is bit-exact
      m.i0[k] = m.i1[k] = dst;
      m.w0[k] = 1.0f;
      m.w1[k] = 0.0f;
      continue;
    }
    float src = std::fma(ratio, static_cast<float>(dst) + 0.5f, -0.5f);
    if (src < 0.0f) src = 0.0f;
    const int64_t i0 = std::min(static_cast<int64_t>(std::floor(src)), in_size - 1);
    const float w1 = std::min(std::max(src - static_cast<float>(i0), 0.0f), 1.0f);
    m.i0[k] = i0;
    m.i1[k] = i0 + (i0 < in_size - 1 ? 1 : 0);
    m.w1[k] = w1;
    m.w0[k] = 1.0f - w1;
  }
  return m;
}

void short_side_size(int64_t height, int64_t width, int64_t size, int64_t* new_h, int64_t* new_w) {
  const bool portrait = height > width;
  const int64_t shorter = portrait ? width : height, longer = portrait ? height : width;
  // Python's int(size * long / short): the product is an exact integer, the true division is correctly rounded in
  // double, int() truncates; the same three steps in C++ give the same integer.
  const int64_t resized_long = static_cast<int64_t>(static_cast<double>(size * longer) / static_cast<double>(shorter));
  *new_h = portrait ? resized_long : size;
  *new_w = portrait ? size : resized_long;
}

int64_t center_offset(int64_t length, int64_t crop) {
  const int64_t d = length - crop;  // >= 0 here
  int64_t half = d / 2;
  if ((d & 1) && (half & 1)) ++half;  // x.5 rounds to the even neighbour, like Python's round()
  return half;
}

std::string validate_spec(const Spec& spec) {
  if (spec.size < 1 || spec.crop < 1 || spec.short_side < 1)
    return "size, crop and short_side must be positive, got size=" + std::to_string(spec.size) +
           " crop=" + std::to_string(spec.crop) + " short_side=" + std::to_string(spec.short_side);
  if (spec.size > kMaxSide || spec.crop > kMaxSide || spec.short_side > kMaxSide)
    return "size, crop and short_side must be at most " + std::to_string(kMaxSide);
  if (spec.crop > spec.short_side)
    return "cannot center-crop " + std::to_string(spec.crop) + "x" + std::to_string(spec.crop) +
           " from a frame whose short side is resized to " + std::to_string(spec.short_side);
  for (int c = 0; c < 3; ++c)
    if (!std::isfinite(spec.scale[c]) || !std::isfinite(spec.bias[c]))
      return "normalisation scale and bias must be finite (is a std zero?)";
  return "";
}

// -- float16 --------------------------------------------------------------------------------------------------
uint16_t float_to_half_bits(float value) {
  uint32_t x;
  std::memcpy(&x, &value, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | (x == 0x7f800000u ? 0x7c00u : 0x7e00u);  // inf stays inf, NaN stays NaN
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 is past the halfway point above 65504: infinity
  if (x < 0x38800000u) {  // below 2^-14: a binary16 subnormal k * 2^-24; scaling by 2^24 is exact in float
    float magnitude;
    std::memcpy(&magnitude, &x, sizeof magnitude);
    return sign | static_cast<uint16_t>(std::nearbyint(magnitude * 16777216.0f));  // default mode: half to even
  }
  x += 0x0fffu + ((x >> 13) & 1u);  // round the 13 dropped mantissa bits to nearest even (a carry bumps the exponent)
  return sign | static_cast<uint16_t>((x - (112u << 23)) >> 13);  // exponent bias 127 -> 15
}

#ifdef EGOVLP_F16C_DISPATCH
// The hardware conversion is 8 values per instruction against ~10 integer ops per value in software; it is
// compiled for AVX+F16C only in this function and chosen at run time, so the wheel still runs on any x86-64.
__attribute__((target("avx,f16c"))) static void floats_to_half_f16c(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = float_to_half_bits(src[i]);
}
static const bool kHasF16C = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
#endif

void floats_to_half(const float* src, uint16_t* dst, int64_t count) {
#ifdef EGOVLP_F16C_DISPATCH
  if (kHasF16C) {
    floats_to_half_f16c(src, dst, count);
    return;
  }
#endif
  for (int64_t i = 0; i < count; ++i) dst[i] = float_to_half_bits(src[i]);
}

// -- the passes -----------------------------------------------------------------------------------------------
namespace {

// Everything about one clip that does not depend on the frame: the two stages' tap tables.
struct ClipPlan {
  AxisMap rows1, cols1;              // stage 1 (frame -> short-side resize), over the crop window only
  std::vector<int64_t> col0, col1;   // cols1's taps as element offsets inside an input row (x * stride_x)
  AxisMap rows2, cols2;              // stage 2 (crop -> size); unused when crop == size
};

ClipPlan make_plan(const ClipView& clip, const Spec& spec) {
  ClipPlan p;
  int64_t resized_h, resized_w;
  short_side_size(clip.height, clip.width, spec.short_side, &resized_h, &resized_w);
  const int64_t top = center_offset(resized_h, spec.crop), left = center_offset(resized_w, spec.crop);
  p.rows1 = bilinear_axis(clip.height, resized_h, top, spec.crop);
  p.cols1 = bilinear_axis(clip.width, resized_w, left, spec.crop);
  p.col0.resize(spec.crop);
  p.col1.resize(spec.crop);
  for (int64_t x = 0; x < spec.crop; ++x) {
    p.col0[x] = p.cols1.i0[x] * clip.stride_x;
    p.col1[x] = p.cols1.i1[x] * clip.stride_x;
  }
  if (spec.crop != spec.size) {
    p.rows2 = bilinear_axis(spec.crop, spec.size, 0, spec.size);
    p.cols2 = bilinear_axis(spec.crop, spec.size, 0, spec.size);
  }
  return p;
}

// Two rows of `len` floats per channel-planar row, keyed by the source row they were computed from. Tap rows are
// requested in non-decreasing order (i0 <= i1, monotone in the output row), so two slots never recompute a row
// except at a band's first output row.
class RowPair {
 public:
  void reset(float* storage, int64_t len) {
    buf_[0] = storage;
    buf_[1] = storage + len;
    key_[0] = key_[1] = -1;
  }
  template <class Fill>
  const float* get(int64_t key, int64_t keep, Fill&& fill) {
    if (key_[0] == key) return buf_[0];
    if (key_[1] == key) return buf_[1];
    const int slot = key_[0] == keep ? 1 : 0;  // never evict the row the caller still holds
    fill(key, buf_[slot]);
    key_[slot] = key;
    return buf_[slot];
  }

 private:
  float* buf_[2] = {nullptr, nullptr};
  int64_t key_[2] = {-1, -1};
};

struct Scratch {
  std::vector<float> storage;
  float *mid = nullptr, *out_row = nullptr;
  RowPair stage1, stage2;

  Scratch(int64_t crop, int64_t size) : storage(static_cast<size_t>(9 * crop + 9 * size)) {}
  void reset(int64_t crop, int64_t size) {
    float* s = storage.data();
    stage1.reset(s, 3 * crop);              // 2 x (3 planes x crop)
    mid = s + 6 * crop;                     // 3 planes x crop
    stage2.reset(s + 9 * crop, 3 * size);   // 2 x (3 planes x size)
    out_row = s + 9 * crop + 6 * size;      // 3 planes x size
  }
};

// Stage-1 horizontal taps of one input row, straight from uint8: dst[c * crop + x]. The uint8 -> float conversion
// and the 1/255 are deferred (bilinear is linear; the affine at the end applies them), so the row is never widened.
void horizontal_u8(const uint8_t* row, int64_t stride_c, const ClipPlan& p, int64_t crop, float* dst) {
  const int64_t* c0 = p.col0.data();
  const int64_t* c1 = p.col1.data();
  const float* w0 = p.cols1.w0.data();
  const float* w1 = p.cols1.w1.data();
  float* d0 = dst;
  float* d1 = dst + crop;
  float* d2 = dst + 2 * crop;
  for (int64_t x = 0; x < crop; ++x) {
    const uint8_t* a = row + c0[x];
    const uint8_t* b = row + c1[x];
    d0[x] = static_cast<float>(a[0]) * w0[x] + static_cast<float>(b[0]) * w1[x];
    d1[x] = static_cast<float>(a[stride_c]) * w0[x] + static_cast<float>(b[stride_c]) * w1[x];
    d2[x] = static_cast<float>(a[2 * stride_c]) * w0[x] + static_cast<float>(b[2 * stride_c]) * w1[x];
  }
}

// Stage-2 horizontal taps of one planar intermediate row (3 x crop) -> 3 x size.
void horizontal_f(const float* src, const AxisMap& cols, int64_t crop, int64_t size, float* dst) {
  const int64_t* i0 = cols.i0.data();
  const int64_t* i1 = cols.i1.data();
  const float* w0 = cols.w0.data();
  const float* w1 = cols.w1.data();
  for (int c = 0; c < 3; ++c) {
    const float* s = src + c * crop;
    float* d = dst + c * size;
    for (int64_t x = 0; x < size; ++x) d[x] = s[i0[x]] * w0[x] + s[i1[x]] * w1[x];
  }
}

// Vertical taps (a * wa + b * wb, the order torch sums in) over n contiguous values.
inline void vertical(const float* a, const float* b, float wa, float wb, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = a[i] * wa + b[i] * wb;
}

// Last vertical taps fused with the normalisation, written to the three output planes' row y.
void emit_row(const float* a, const float* b, float wa, float wb, int64_t size, const Spec& spec, bool half,
              void* const planes[3], int64_t y, float* tmp) {
  for (int c = 0; c < 3; ++c) {
    const float* ac = a + c * size;
    const float* bc = b + c * size;
    const float sc = spec.scale[c], bi = spec.bias[c];
    float* d = half ? tmp : static_cast<float*>(planes[c]) + y * size;
    for (int64_t x = 0; x < size; ++x) d[x] = (ac[x] * wa + bc[x] * wb) * sc + bi;
    if (half) floats_to_half(tmp, static_cast<uint16_t*>(planes[c]) + y * size, size);
  }
}

// Output rows [y_begin, y_end) of frame t of one clip.
void run_band(const ClipView& clip, const ClipPlan& p, const Spec& spec, int64_t t, int64_t y_begin, int64_t y_end,
              bool half, void* const planes[3], Scratch& s) {
  const int64_t crop = spec.crop, size = spec.size;
  s.reset(crop, size);
  const uint8_t* frame = clip.data + t * clip.stride_t;
  auto fill_stage1 = [&](int64_t input_row, float* dst) {
    horizontal_u8(frame + input_row * clip.stride_y, clip.stride_c, p, crop, dst);
  };
  // Intermediate (cropped, short-side-resized) row r, in 3 planes of crop values: exactly the reference's value
  // before the second resize, up to the deferred pixel scale.
  auto intermediate_taps = [&](int64_t r, const float** a, const float** b) {
    const int64_t i0 = p.rows1.i0[r], i1 = p.rows1.i1[r];
    *a = s.stage1.get(i0, i1, fill_stage1);
    *b = s.stage1.get(i1, i0, fill_stage1);
  };

  if (crop == size) {  // EK-100: one resize, its vertical taps go straight to the output
    for (int64_t y = y_begin; y < y_end; ++y) {
      const float *a, *b;
      intermediate_taps(y, &a, &b);
      emit_row(a, b, p.rows1.w0[y], p.rows1.w1[y], size, spec, half, planes, y, s.out_row);
    }
    return;
  }
  auto fill_stage2 = [&](int64_t r, float* dst) {
    const float *a, *b;
    intermediate_taps(r, &a, &b);
    vertical(a, b, p.rows1.w0[r], p.rows1.w1[r], 3 * crop, s.mid);
    horizontal_f(s.mid, p.cols2, crop, size, dst);
  };
  for (int64_t y = y_begin; y < y_end; ++y) {
    const int64_t r0 = p.rows2.i0[y], r1 = p.rows2.i1[y];
    const float* a = s.stage2.get(r0, r1, fill_stage2);
    const float* b = s.stage2.get(r1, r0, fill_stage2);
    emit_row(a, b, p.rows2.w0[y], p.rows2.w1[y], size, spec, half, planes, y, s.out_row);
  }
}

int default_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
#endif
}

}  // namespace

void preprocess_clips(const std::vector<ClipView>& clips, const Spec& spec, Layout layout, bool half, void* out,
                      int threads) {
  const std::string problem = validate_spec(spec);
  if (!problem.empty()) throw std::invalid_argument(problem);
  if (clips.empty()) return;
  const int64_t frames = clips[0].frames, size = spec.size, plane = size * size;
  std::vector<ClipPlan> plans;
  plans.reserve(clips.size());
  for (const ClipView& c : clips) plans.push_back(make_plan(c, spec));

  if (threads <= 0) threads = default_threads();
  const int64_t total_frames = static_cast<int64_t>(clips.size()) * frames;
  const int64_t wanted = (kItemsPerThread * threads + total_frames - 1) / total_frames;
  const int64_t bands = std::max<int64_t>(1, std::min(wanted, size / kMinBandRows));
  const int64_t items = total_frames * bands;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({threads, items, kMaxThreads})));
  // Scratch is allocated here, outside the parallel region, so an allocation failure is an exception for Python
  // rather than std::terminate inside a worker.
  std::vector<Scratch> scratch;
  scratch.reserve(threads);
  for (int i = 0; i < threads; ++i) scratch.emplace_back(spec.crop, size);

  auto work = [&](int64_t item, int worker) {
    const int64_t band = item % bands, frame_index = item / bands;
    const int64_t b = frame_index / frames, t = frame_index % frames;
    const int64_t y_begin = band * size / bands, y_end = (band + 1) * size / bands;
    void* planes[3];
    for (int c = 0; c < 3; ++c) {
      const int64_t within = layout == Layout::TCHW ? t * 3 + c : c * frames + t;  // plane index inside the clip
      const int64_t offset = (b * 3 * frames + within) * plane;
      planes[c] = half ? static_cast<void*>(static_cast<uint16_t*>(out) + offset)
                       : static_cast<void*>(static_cast<float*>(out) + offset);
    }
    run_band(clips[b], plans[b], spec, t, y_begin, y_end, half, planes, scratch[worker]);
  };

#ifdef _OPENMP
  // OpenMP, not a private pool: torch's wheel ships libgomp.so.1 under the same soname, so once torch is imported
  // this reuses torch's worker threads instead of adding a second set that would contend for the same cores.
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t item = 0; item < items; ++item) work(item, omp_get_thread_num());
#else
  std::vector<std::thread> pool;
  std::atomic<int64_t> next{0};
  for (int w = 0; w < threads; ++w)
    pool.emplace_back([&, w] {
      for (int64_t item = next++; item < items; item = next++) work(item, w);
    });
  for (auto& th : pool) th.join();
#endif
}

}  // namespace egovlp
