// Python bindings of egovlp_deploy's native extension, `egovlp_deploy._C`.
// Every argument is checked here, with the GIL held, before any pointer is touched: a bad call is a Python
// ValueError/TypeError, never a crash. The work itself runs with the GIL released.
// build_info() lets `egovlp-deploy info` and the tests confirm how the installed wheel was really built.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "preprocess.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
                     std::to_string(__GNUC_PATCHLEVEL__);
#elif defined(_MSC_VER)
  info["compiler"] = "msvc " + std::to_string(_MSC_VER);
#else
  info["compiler"] = "unknown";
#endif
  info["cplusplus"] = static_cast<long>(__cplusplus);
#ifdef _OPENMP
  info["openmp"] = true;
  info["max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["max_threads"] = static_cast<int>(std::thread::hardware_concurrency());
#endif
#ifdef NDEBUG
  info["build_type"] = "release";
#else
  info["build_type"] = "debug";
#endif
#if defined(__SANITIZE_ADDRESS__)
  info["sanitizers"] = "address,undefined";
#else
  info["sanitizers"] = "none";
#endif
  return info;
}

// A buffer's format code without its byte-order prefix ('<f', '=f', '@f' -> 'f'); '>' on this little-endian
// library would mean byte-swapped data, so it is kept and then rejected.
std::string base_format(const std::string& format) {
  if (!format.empty() && (format[0] == '@' || format[0] == '=' || format[0] == '<')) return format.substr(1);
  return format;
}

std::string shape_str(const std::vector<py::ssize_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// Lowest and one-past-highest byte a strided buffer can touch (strides may be negative or zero).
std::pair<const char*, const char*> byte_range(const py::buffer_info& info) {
  const char* lo = static_cast<const char*>(info.ptr);
  const char* hi = lo + info.itemsize;
  for (size_t d = 0; d < info.shape.size(); ++d) {
    const py::ssize_t extent = (info.shape[d] - 1) * info.strides[d];
    (extent < 0 ? lo : hi) += extent;
  }
  return {lo, hi};
}

egovlp::ClipView clip_view(const py::buffer_info& info, const std::string& name) {
  if (info.ndim != 4)
    throw py::value_error(name + " must have 4 dimensions (T, H, W, 3), got shape " + shape_str(info.shape));
  const std::string fmt = base_format(info.format);
  if (info.itemsize != 1 || (fmt != "B" && fmt != ">B"))
    throw py::type_error(name + " must be uint8, got buffer format '" + info.format + "'");
  if (info.shape[3] != 3)
    throw py::value_error(name + " must have 3 channels (RGB) in its last dimension, got shape " +
                          shape_str(info.shape));
  if (info.shape[0] == 0) throw py::value_error(name + " is an empty clip (0 frames)");
  if (info.shape[1] == 0 || info.shape[2] == 0)
    throw py::value_error(name + " has zero-size frames: shape " + shape_str(info.shape));
  egovlp::ClipView v;
  v.data = static_cast<const uint8_t*>(info.ptr);
  v.frames = info.shape[0];
  v.height = info.shape[1];
  v.width = info.shape[2];
  v.stride_t = info.strides[0];  // uint8: byte strides are element strides
  v.stride_y = info.strides[1];
  v.stride_x = info.strides[2];
  v.stride_c = info.strides[3];
  return v;
}

egovlp::Layout parse_layout(const std::string& layout) {
  if (layout == "TCHW") return egovlp::Layout::TCHW;
  if (layout == "CTHW") return egovlp::Layout::CTHW;
  throw py::value_error("layout must be 'TCHW' (T, 3, S, S) or 'CTHW' (3, T, S, S), got '" + layout + "'");
}

egovlp::Spec make_spec(int64_t short_side, int64_t crop, int64_t size, double pixel_scale,
                       const std::array<double, 3>& mean, const std::array<double, 3>& std) {
  egovlp::Spec spec;
  spec.short_side = short_side;
  spec.crop = crop;
  spec.size = size;
  for (int c = 0; c < 3; ++c) {  // (x * pixel_scale - mean) / std folded into one multiply-add, computed in double
    spec.scale[c] = static_cast<float>(pixel_scale / std[c]);
    spec.bias[c] = static_cast<float>(-mean[c] / std[c]);
  }
  const std::string problem = egovlp::validate_spec(spec);
  if (!problem.empty()) throw py::value_error(problem);
  return spec;
}

// Checks the caller's output buffer: writable, float32 or float16, exactly `shape`, C-contiguous.
// Returns true for float16.
bool check_out(py::buffer& out, py::buffer_info& info, const std::vector<py::ssize_t>& shape) {
  try {
    info = out.request(/*writable=*/true);
  } catch (py::error_already_set& e) {
    throw py::value_error(std::string("out must be a writable buffer: ") + e.what());
  }
  const std::string fmt = base_format(info.format);
  bool half;
  if (fmt == "f" && info.itemsize == 4)
    half = false;
  else if (fmt == "e" && info.itemsize == 2)
    half = true;
  else
    throw py::type_error("out must be float32 or float16, got buffer format '" + info.format + "'");
  if (info.shape != shape)
    throw py::value_error("out has shape " + shape_str(info.shape) + ", expected " + shape_str(shape));
  py::ssize_t expected = info.itemsize;
  for (size_t d = shape.size(); d-- > 0;) {
    if (shape[d] != 1 && info.strides[d] != expected) throw py::value_error("out must be C-contiguous");
    expected *= shape[d];
  }
  return half;
}

void check_no_overlap(const py::buffer_info& in, const py::buffer_info& out, const std::string& name) {
  const auto a = byte_range(in), b = byte_range(out);
  if (a.first < b.second && b.first < a.second) throw py::value_error("out overlaps the memory of " + name);
}

std::vector<py::ssize_t> clip_shape(egovlp::Layout layout, py::ssize_t frames, py::ssize_t size) {
  if (layout == egovlp::Layout::TCHW) return {frames, 3, size, size};
  return {3, frames, size, size};
}

void run(const std::vector<egovlp::ClipView>& clips, const egovlp::Spec& spec, egovlp::Layout layout, bool half,
         void* out, int threads) {
  py::gil_scoped_release release;  // pure C++ from here: other Python threads (decoders, loaders) keep running
  egovlp::preprocess_clips(clips, spec, layout, half, out, threads);
}

void preprocess(py::buffer frames, py::buffer out, int64_t short_side, int64_t crop, int64_t size, double pixel_scale,
                std::array<double, 3> mean, std::array<double, 3> std, const std::string& layout, int threads) {
  const egovlp::Spec spec = make_spec(short_side, crop, size, pixel_scale, mean, std);
  const egovlp::Layout lay = parse_layout(layout);
  const py::buffer_info in = frames.request();
  const egovlp::ClipView clip = clip_view(in, "frames");
  py::buffer_info out_info;
  const bool half = check_out(out, out_info, clip_shape(lay, clip.frames, size));
  check_no_overlap(in, out_info, "frames");
  run({clip}, spec, lay, half, out_info.ptr, threads);
}

void preprocess_batch(const py::sequence& clips, py::buffer out, int64_t short_side, int64_t crop, int64_t size,
                      double pixel_scale, std::array<double, 3> mean, std::array<double, 3> std,
                      const std::string& layout, int threads) {
  const egovlp::Spec spec = make_spec(short_side, crop, size, pixel_scale, mean, std);
  const egovlp::Layout lay = parse_layout(layout);
  if (py::len(clips) == 0) throw py::value_error("clips is empty");
  std::vector<py::buffer_info> infos;  // holds every input buffer (and its exporter) alive while the GIL is released
  std::vector<egovlp::ClipView> views;
  for (size_t b = 0; b < py::len(clips); ++b) {
    const std::string name = "clips[" + std::to_string(b) + "]";
    py::object item = clips[b];
    if (!PyObject_CheckBuffer(item.ptr()))
      throw py::type_error(name + " does not expose the buffer protocol (pass numpy arrays)");
    infos.push_back(py::reinterpret_borrow<py::buffer>(item).request());
    views.push_back(clip_view(infos.back(), name));
    if (views.back().frames != views[0].frames)
      throw py::value_error("all clips must have the same number of frames: clips[0] has " +
                            std::to_string(views[0].frames) + ", " + name + " has " +
                            std::to_string(views.back().frames));
  }
  std::vector<py::ssize_t> shape = clip_shape(lay, views[0].frames, size);
  shape.insert(shape.begin(), static_cast<py::ssize_t>(views.size()));
  py::buffer_info out_info;
  const bool half = check_out(out, out_info, shape);
  for (size_t b = 0; b < infos.size(); ++b) check_no_overlap(infos[b], out_info, "clips[" + std::to_string(b) + "]");
  run(views, spec, lay, half, out_info.ptr, threads);
}

// The portable float -> float16 rounding, exposed so the tests can check it against numpy on every edge case
// (the runtime path prefers F16C when the CPU has it).
py::bytes float_to_half_bits(py::buffer values) {
  const py::buffer_info info = values.request();
  if (base_format(info.format) != "f" || info.itemsize != 4 || info.ndim != 1 || info.strides[0] != 4)
    throw py::type_error("expected a contiguous 1-D float32 buffer");
  std::string bits(static_cast<size_t>(info.shape[0]) * 2, '\0');
  const float* src = static_cast<const float*>(info.ptr);
  for (py::ssize_t i = 0; i < info.shape[0]; ++i) {
    const uint16_t h = egovlp::float_to_half_bits(src[i]);
    std::memcpy(&bits[static_cast<size_t>(i) * 2], &h, 2);
  }
  return py::bytes(bits);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "egovlp-deploy native host-side operations (use egovlp_deploy.preprocess, not this module directly)";
  m.def("build_info", &build_info, "Compiler, C++ standard, OpenMP, build type and sanitizers of this extension.");
  const char* doc_args =
      "short_side, crop, size: resize the short side to short_side, center-crop crop x crop, resize to size x size "
      "(bilinear, align_corners=False, no antialias, torch's arithmetic). pixel_scale, mean, std: "
      "out = (x * pixel_scale - mean) / std. layout: 'TCHW' or 'CTHW'. threads <= 0: the OpenMP default.";
  m.def("preprocess", &preprocess,
        (std::string("uint8 frames (T, H, W, 3), any strides -> out, a C-contiguous float32/float16 buffer of shape "
                     "(T, 3, S, S) or (3, T, S, S). ") + doc_args).c_str(),
        py::arg("frames"), py::arg("out"), py::kw_only(), py::arg("short_side"), py::arg("crop"), py::arg("size"),
        py::arg("pixel_scale"), py::arg("mean"), py::arg("std"), py::arg("layout") = "TCHW", py::arg("threads") = 0);
  m.def("preprocess_batch", &preprocess_batch,
        (std::string("B uint8 clips with the same frame count (sizes may differ) -> out of shape (B, T, 3, S, S) or "
                     "(B, 3, T, S, S), all frames in one parallel region. ") + doc_args).c_str(),
        py::arg("clips"), py::arg("out"), py::kw_only(), py::arg("short_side"), py::arg("crop"), py::arg("size"),
        py::arg("pixel_scale"), py::arg("mean"), py::arg("std"), py::arg("layout") = "TCHW", py::arg("threads") = 0);
  m.def("_float_to_half_bits", &float_to_half_bits,
        "float32 1-D buffer -> bytes of its float16 bits (round to nearest even), by the portable routine.");
}
