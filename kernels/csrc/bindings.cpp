// Python bindings of egovlp_deploy's native extension (`egovlp_deploy._native`).
// The video-preprocessing ops are declared here as they land; build_info() lets `egovlp-deploy info` and the
// tests confirm which compiler and threading the installed wheel was really built with.
#include <pybind11/pybind11.h>

#include <string>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

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
  return info;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "egovlp-deploy native host-side operations";
  m.def("build_info", &build_info, "Compiler, C++ standard, OpenMP and build type of this extension.");
}
