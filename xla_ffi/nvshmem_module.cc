// jax_deepep.gpu._nvshmem_lib: the NVSHMEM kernels' library (low latency and internode) as a Python
// extension module. Its functions raise RuntimeError with the runtime's message;
// jax_deepep/gpu/library.py loads it after libnvshmem_host.so.3.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "xla_ffi/ffi_targets.h"
#include "xla_ffi/nvshmem_runtime.h"

namespace py = pybind11;
namespace jd = jax_deepep;

// Calls that wait for the device or for the other PEs let other Python threads run meanwhile.
const py::call_guard<py::gil_scoped_release> kNoGil;

PYBIND11_MODULE(_nvshmem_lib, m) {
  m.doc() = "jax_deepep NVSHMEM kernels (low latency, internode): the process's PE, symmetric buffers, "
            "XLA FFI handlers";
  m.def("ffi_targets", [] {
    py::dict out;
    for (const auto& targets : {jd::low_latency_ffi_targets(), jd::internode_ffi_targets()}) {
      for (const jd::FfiTarget& t : targets) out[t.name.c_str()] = py::capsule(t.handler);
    }
    return out;
  }, "{target name: XLA FFI handler capsule}");
  m.def("unique_id", [] { return py::bytes(jd::nvshmem_unique_id()); });
  m.def("join", [](py::bytes unique_id, int rank, int num_ranks, int device) {
    const std::string id = unique_id;
    py::gil_scoped_release release;
    jd::nvshmem_join(id, rank, num_ranks, device);
  }, py::arg("unique_id"), py::arg("rank"), py::arg("num_ranks"), py::arg("device"));
  m.def("pe", &jd::nvshmem_pe, "(rank, number of ranks) once joined, else None");
  m.def("create", &jd::nvshmem_create, kNoGil, py::arg("buffer_id"), py::arg("device"), py::arg("num_bytes"),
        py::arg("timeout_s"), py::arg("direct_group"), py::arg("map_other_groups"));
  m.def("retire", &jd::nvshmem_retire, kNoGil, py::arg("buffer_id"), py::arg("device"));
  m.def("release", &jd::nvshmem_release, kNoGil, py::arg("buffer_id"), py::arg("device"),
        py::arg("collective_free"));
  m.def("leave", &jd::nvshmem_leave, kNoGil, py::arg("finalize"));
  m.def("failure", &jd::nvshmem_failure, py::arg("buffer_id"), py::arg("device"),
        "what the first failed kernel of the buffer reports, \"\" if none failed");
  m.def("internode_traffic", &jd::internode_traffic, kNoGil, py::arg("buffer_id"), py::arg("device"));
}
