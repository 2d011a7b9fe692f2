// jax_deepep.gpu._intranode_lib: the normal-mode library as a Python extension module. Its
// functions raise RuntimeError with the runtime's message; jax_deepep/gpu/library.py loads it.
#include <pybind11/pybind11.h>

#include "cuda/comm_layout.h"
#include "xla_ffi/ffi_targets.h"
#include "xla_ffi/runtime.h"

namespace py = pybind11;
namespace jd = jax_deepep;

// Calls that wait for the device let other Python threads run meanwhile.
const py::call_guard<py::gil_scoped_release> kNoGil;

PYBIND11_MODULE(_intranode_lib, m) {
  m.doc() = "jax_deepep normal-mode (intranode) CUDA kernels: communication buffers and XLA FFI handlers";
  m.def("ffi_targets", [] {
    py::dict out;
    // The normal-mode ops, and the low-latency ops within one node (the handlers of _nvshmem_lib, built
    // without NVSHMEM: xla_ffi/low_latency_memory.h).
    for (const auto& targets : {jd::intranode_ffi_targets(), jd::low_latency_ffi_targets()}) {
      for (const jd::FfiTarget& t : targets) out[t.name.c_str()] = py::capsule(t.handler);
    }
    return out;
  }, "{target name: XLA FFI handler capsule}");
  m.def("create", &jd::create_comm_buffer, kNoGil, py::arg("buffer_id"), py::arg("device"), py::arg("rank"),
        py::arg("num_ranks"), py::arg("num_bytes"), py::arg("timeout_s"), py::arg("low_latency_bytes"));
  m.def("ipc_handle", [](int64_t buffer_id, int device) {
    return py::bytes(jd::comm_buffer_ipc_handle(buffer_id, device));
  }, py::arg("buffer_id"), py::arg("device"));
  m.def("connect_ipc", [](int64_t buffer_id, int device, int peer_rank, py::bytes handle) {
    jd::connect_ipc(buffer_id, device, peer_rank, handle);
  }, py::arg("buffer_id"), py::arg("device"), py::arg("peer_rank"), py::arg("handle"));
  m.def("connect_local", &jd::connect_local, kNoGil, py::arg("buffer_id"), py::arg("device"), py::arg("peer_rank"),
        py::arg("peer_device"));
  m.def("disconnect", &jd::disconnect, kNoGil, py::arg("buffer_id"), py::arg("device"));
  m.def("destroy", &jd::destroy_comm_buffer, kNoGil, py::arg("buffer_id"), py::arg("device"));
  m.def("failure", &jd::comm_buffer_failure, py::arg("buffer_id"), py::arg("device"),
        "what the first failed kernel of the buffer reports, \"\" if none failed");
  m.def("device_free_bytes", &jd::device_free_bytes, py::arg("device"));
  m.attr("RING_OFFSET") = jd::ring_offset();
  m.attr("MAX_RANKS") = jd::kMaxRanks;
  m.attr("MAX_CHANNELS") = jd::kMaxChannels;
  m.attr("MAX_LOCAL_EXPERTS") = jd::kMaxLocalExperts;
}
