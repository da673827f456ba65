// The binding convention of kdops' native modules (see csrc/README.md).
//
// kdops._C (cpu/module.cpp) and kdops._C_cuda (cuda/module.cpp) expose the same functions with
// the same Python signatures; each family's header here, bindings/<family>.h, defines them once:
//
//   template <typename... Stream>
//   void def_<family>(py::module_& m, void (*entry)(const <Family>Params&, Stream...), ...);
//
// The CPU module passes its entry points `void f(const P&)` (Stream... empty); the CUDA module
// passes `void f(const P&, uintptr_t stream)`, which adds a trailing `stream` argument (a
// cudaStream_t as an integer) to the Python function: stream_arg<Stream>()... names it. The
// Python functions take data addresses (uintptr_t, 0 = none), sizes and strides in elements and
// the codes of common/codes.h; they check them (ValueError naming the function), fill the
// family's params struct and run the entry point without the GIL. Nothing here links libtorch.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace kdops {
namespace bindings {

namespace py = pybind11;

// ValueError "kdops.<fn>: <what>" unless ok.
inline void check(bool ok, const char* fn, const std::string& what) {
  if (!ok) throw py::value_error(std::string("kdops.") + fn + ": " + what);
}

inline const void* cptr(uintptr_t address) { return reinterpret_cast<const void*>(address); }
inline void* mptr(uintptr_t address) { return reinterpret_cast<void*>(address); }

// The Python argument of one trailing launch parameter (the CUDA module's stream).
template <typename>
py::arg stream_arg() {
  return py::arg("stream");
}

// The docstring of a function: `doc`, plus the CUDA module's launch note.
template <typename... Stream>
std::string docstring(const char* doc) {
  std::string s(doc);
  if (sizeof...(Stream) > 0)
    s += "\nOn kdops._C_cuda: device pointers, launched asynchronously on the CUDA stream `stream`\n"
         "(a cudaStream_t as an integer; 0: the default stream) of the current device.";
  return s;
}

}  // namespace bindings
}  // namespace kdops
