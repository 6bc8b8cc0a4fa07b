// Clip preprocessing for EgoVLPv2: uint8 frames (T, H, W, 3) -> normalised float32/float16 planes.
//
// The pipeline is the official eval transform as egovlp_deploy/transforms.py computes it (that file is the spec):
//   resize the short side to `short_side` (long side int(short_side * long / short)), bilinear, align_corners=False,
//   no antialias -> center crop `crop` x `crop` (offset round-half-even) -> bilinear resize to `size` x `size`
//   -> (x * pixel_scale - mean) / std.
// EgoClip/EgoMCQ/Charades: short_side = crop = round(size * 256 / 224), size = S. EK-100: short_side = crop = size.
//
// Two bilinear resizes in a row are not one bilinear map (the second samples values the first interpolated), so
// the intermediate crop is computed as the reference computes it, but only the crop window of it, row by row, and
// straight from the uint8 frame: no full-frame float copy, no full-size resized image. Every pass is separable in
// torch's own order (horizontal taps first, then vertical), with torch's index and weight arithmetic in float.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace egovlp {

// One axis of one bilinear resize, evaluated at the output indices [begin, begin + count) only.
struct AxisMap {
  std::vector<int64_t> i0, i1;  // source indices of the two taps (equal at the border, as in torch)
  std::vector<float> w0, w1;    // their weights, w0 = 1 - w1
};

// torch's upsample_bilinear2d rule (ATen/native/UpSample.h, align_corners=False, no explicit scale):
// scale = float(in) / out; src = max(scale * (dst + 0.5) - 0.5, 0); i0 = min(floor(src), in - 1);
// w1 = clamp(src - i0, 0, 1); i1 = i0 + (i0 < in - 1); and a plain copy when in == out.
AxisMap bilinear_axis(int64_t in_size, int64_t out_size, int64_t begin, int64_t count);

// torchvision Resize(int): (new_h, new_w) with the short side = size and the long side int(size * long / short).
void short_side_size(int64_t height, int64_t width, int64_t size, int64_t* new_h, int64_t* new_w);

// torchvision CenterCrop offset: int(round((length - crop) / 2)) with Python's round (half to even).
int64_t center_offset(int64_t length, int64_t crop);

struct Spec {
  int64_t short_side = 256;  // the short side is resized to this first
  int64_t crop = 256;        // then a centred crop x crop window is taken
  int64_t size = 224;        // then that window is resized to size x size (skipped when crop == size)
  float scale[3] = {1, 1, 1};  // out = bilinear(uint8) * scale[c] + bias[c]: pixel_scale / std, -mean / std
  float bias[3] = {0, 0, 0};
};

// A uint8 clip in memory with arbitrary (possibly zero or negative) element strides.
struct ClipView {
  const uint8_t* data = nullptr;
  int64_t frames = 0, height = 0, width = 0;
  int64_t stride_t = 0, stride_y = 0, stride_x = 0, stride_c = 0;
};

enum class Layout { TCHW, CTHW };  // output (T, 3, S, S) or (3, T, S, S) per clip

// Preprocess clips[b] into out (contiguous, float32 or float16 bits), clip b at out + b * T * 3 * S * S elements.
// All clips must have the same frame count; frame sizes may differ. Thread-safe, no Python involved; `threads`
// <= 0 means the OpenMP default. Inputs must already be validated (validate_spec / the bindings do that).
void preprocess_clips(const std::vector<ClipView>& clips, const Spec& spec, Layout layout, bool half, void* out,
                      int threads);

// Empty string when the spec is usable, else what is wrong with it.
std::string validate_spec(const Spec& spec);

// IEEE float -> binary16 bits, round to nearest even (the portable path; F16C is used when the CPU has it).
uint16_t float_to_half_bits(float value);
void floats_to_half(const float* src, uint16_t* dst, int64_t count);

}  // namespace egovlp
