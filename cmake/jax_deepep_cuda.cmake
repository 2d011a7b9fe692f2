# The extension module of the normal (intranode) mode, jax_deepep/gpu/_intranode_lib.so: kernels
# (cuda/) plus XLA FFI handlers, host runtime and Python bindings (xla_ffi/), and the low-latency
# kernels and handlers built without NVSHMEM for one node (JDEEP_WITHOUT_NVSHMEM: cuda/remote_put.cuh,
# xla_ffi/low_latency_memory.h). The NVSHMEM kernels build into their own module
# (cmake/jax_deepep_nvshmem.cmake). Included by the root CMakeLists.txt once a CUDA compiler was
# found and enabled, after cmake/jax_deepep_python.cmake.

find_package(CUDAToolkit REQUIRED)

jax_deepep_add_module(_intranode_lib cmake/intranode_lib.map
  cuda/layout.cu
  cuda/intranode_dispatch.cu
  cuda/intranode_combine.cu
  cuda/low_latency.cu
  xla_ffi/intranode_ffi.cc
  xla_ffi/intranode_module.cc
  xla_ffi/ipc_low_latency_memory.cc
  xla_ffi/low_latency_ffi.cc
  xla_ffi/runtime.cc)
target_compile_definitions(_intranode_lib PRIVATE JDEEP_WITHOUT_NVSHMEM)
set_target_properties(_intranode_lib PROPERTIES
  CUDA_ARCHITECTURES 90            # sm_90 machine code + compute_90 PTX
  CUDA_SEPARABLE_COMPILATION OFF)
target_compile_options(_intranode_lib PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-O3 -lineinfo -Xcompiler=-fvisibility=hidden>
  $<$<COMPILE_LANGUAGE:CXX>:-O2 -Wall>)
target_link_libraries(_intranode_lib PRIVATE CUDA::cudart_static)
