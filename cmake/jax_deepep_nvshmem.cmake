# The extension module of the NVSHMEM kernels, jax_deepep/gpu/_nvshmem_lib.so: cuda/low_latency.cu
# and cuda/internode_*.cu with their XLA FFI handlers, the NVSHMEM runtime and Python bindings
# (xla_ffi/). A module of its own because it needs relocatable device code linked against
# libnvshmem_device.a, which the intranode module does not. NVSHMEM comes from the pip package
# nvidia-nvshmem-cu13; without it the module is skipped.
option(JAX_DEEPEP_WITH_NVSHMEM "Build the NVSHMEM module when NVSHMEM is found" ON)
set(JAX_DEEPEP_NVSHMEM_CUDA_ARCHITECTURES "90" CACHE STRING "CUDA architectures of _nvshmem_lib")

function(jax_deepep_add_nvshmem_module)
  if(NOT JAX_DEEPEP_WITH_NVSHMEM)
    message(STATUS "jax_deepep: NVSHMEM module disabled (JAX_DEEPEP_WITH_NVSHMEM=OFF)")
    return()
  endif()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import nvidia.nvshmem as m; print(list(m.__path__)[0])"
    OUTPUT_VARIABLE nvshmem_dir OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE nvshmem_missing ERROR_QUIET)
  if(nvshmem_missing OR NOT EXISTS "${nvshmem_dir}/lib/libnvshmem_device.a"
     OR NOT EXISTS "${nvshmem_dir}/lib/libnvshmem_host.so.3")
    message(STATUS "jax_deepep: NVSHMEM not found (pip install nvidia-nvshmem-cu13); skipping the NVSHMEM module")
    return()
  endif()
  # NVSHMEM refuses to start when its host library's version differs from the device library's
  # linked in here: _build_info.json records this one, jax_deepep/gpu/library.py checks it at load.
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import importlib.metadata as m; print(m.version('nvidia-nvshmem-cu13'))"
    OUTPUT_VARIABLE nvshmem_version OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE nvshmem_unversioned ERROR_QUIET)
  if(nvshmem_unversioned)
    message(FATAL_ERROR "jax_deepep: NVSHMEM in ${nvshmem_dir} has no nvidia-nvshmem-cu13 package version")
  endif()
  set(JAX_DEEPEP_NVSHMEM_VERSION "${nvshmem_version}" PARENT_SCOPE)
  find_package(CUDAToolkit REQUIRED)

  jax_deepep_add_module(_nvshmem_lib cmake/nvshmem_lib.map
    cuda/low_latency.cu
    cuda/internode_combine.cu
    cuda/internode_dispatch.cu
    xla_ffi/low_latency_ffi.cc
    xla_ffi/internode_ffi.cc
    xla_ffi/nvshmem_low_latency_memory.cc
    xla_ffi/nvshmem_module.cc
    xla_ffi/nvshmem_runtime.cc)
  set_target_properties(_nvshmem_lib PROPERTIES
    CUDA_ARCHITECTURES "${JAX_DEEPEP_NVSHMEM_CUDA_ARCHITECTURES}"
    CUDA_SEPARABLE_COMPILATION ON
    CUDA_RESOLVE_DEVICE_SYMBOLS ON
    # NVSHMEM's symbols keep their visibility; the version script decides what is exported.
    CUDA_VISIBILITY_PRESET default)
  # CUDA 13 moved CCCL (needed by the NVSHMEM headers) into include/cccl.
  set(cccl_include "")
  foreach(dir ${CUDAToolkit_INCLUDE_DIRS})
    if(EXISTS "${dir}/cccl")
      list(APPEND cccl_include "${dir}/cccl")
    endif()
  endforeach()
  target_include_directories(_nvshmem_lib PRIVATE "${nvshmem_dir}/include" ${CUDAToolkit_INCLUDE_DIRS} ${cccl_include})
  target_link_directories(_nvshmem_lib PRIVATE "${nvshmem_dir}/lib")
  # The host library is found at run time through the preload in jax_deepep/gpu/library.py.
  target_link_libraries(_nvshmem_lib PRIVATE "${nvshmem_dir}/lib/libnvshmem_device.a" -l:libnvshmem_host.so.3)
  message(STATUS "jax_deepep: building _nvshmem_lib with NVSHMEM ${nvshmem_version} from ${nvshmem_dir}")
endfunction()

jax_deepep_add_nvshmem_module()
