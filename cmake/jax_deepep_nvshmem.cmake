# libjax_deepep_nvshmem.so: the kernels over NVSHMEM (cuda/low_latency.cu, cuda/internode.cu) with
# their XLA FFI handlers and the NVSHMEM runtime (xla_ffi/). A library of its own because it needs
# relocatable device code linked against libnvshmem_device.a, which the intranode library does not.
# NVSHMEM comes from the pip package nvidia-nvshmem-cu13; without it the library is skipped.
option(JAX_DEEPEP_WITH_NVSHMEM "Build the NVSHMEM low-latency library when NVSHMEM is found" ON)
set(JAX_DEEPEP_NVSHMEM_CUDA_ARCHITECTURES "90" CACHE STRING "CUDA architectures of libjax_deepep_nvshmem")
get_filename_component(JAX_DEEPEP_SOURCE_ROOT "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)

function(jax_deepep_add_nvshmem_library)
  if(NOT JAX_DEEPEP_WITH_NVSHMEM)
    message(STATUS "jax_deepep: NVSHMEM low-latency library disabled (JAX_DEEPEP_WITH_NVSHMEM=OFF)")
    return()
  endif()
  if(NOT Python_EXECUTABLE)
    find_package(Python COMPONENTS Interpreter REQUIRED)
  endif()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import nvidia.nvshmem as m; print(list(m.__path__)[0])"
    OUTPUT_VARIABLE nvshmem_dir OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE nvshmem_missing ERROR_QUIET)
  if(nvshmem_missing OR NOT EXISTS "${nvshmem_dir}/lib/libnvshmem_device.a"
     OR NOT EXISTS "${nvshmem_dir}/lib/libnvshmem_host.so.3")
    message(STATUS "jax_deepep: NVSHMEM not found (pip install nvidia-nvshmem-cu13); "
                   "skipping the low-latency library")
    return()
  endif()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import jax.ffi; print(jax.ffi.include_dir())"
    OUTPUT_VARIABLE ffi_include OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE ffi_missing ERROR_QUIET)
  if(ffi_missing)
    message(STATUS "jax_deepep: jax (for the XLA FFI headers) not importable; skipping the low-latency library")
    return()
  endif()
  find_package(CUDAToolkit REQUIRED)

  add_library(jax_deepep_nvshmem SHARED
    "${JAX_DEEPEP_SOURCE_ROOT}/cuda/low_latency.cu"
    "${JAX_DEEPEP_SOURCE_ROOT}/cuda/internode.cu"
    "${JAX_DEEPEP_SOURCE_ROOT}/xla_ffi/low_latency_ffi.cc"
    "${JAX_DEEPEP_SOURCE_ROOT}/xla_ffi/internode_ffi.cc"
    "${JAX_DEEPEP_SOURCE_ROOT}/xla_ffi/nvshmem_runtime.cc")
  set_target_properties(jax_deepep_nvshmem PROPERTIES
    CUDA_ARCHITECTURES "${JAX_DEEPEP_NVSHMEM_CUDA_ARCHITECTURES}"
    CUDA_SEPARABLE_COMPILATION ON
    CUDA_RESOLVE_DEVICE_SYMBOLS ON
    POSITION_INDEPENDENT_CODE ON
    CXX_STANDARD 17
    CUDA_STANDARD 17)
  # CUDA 13 moved CCCL (needed by the NVSHMEM headers) into include/cccl.
  set(cccl_include "")
  foreach(dir ${CUDAToolkit_INCLUDE_DIRS})
    if(EXISTS "${dir}/cccl")
      list(APPEND cccl_include "${dir}/cccl")
    endif()
  endforeach()
  target_include_directories(jax_deepep_nvshmem PRIVATE
    "${JAX_DEEPEP_SOURCE_ROOT}" "${nvshmem_dir}/include" ${CUDAToolkit_INCLUDE_DIRS} ${cccl_include})
  # As in cmake/jax_deepep_cuda.cmake: the FFI headers do not compile warning-free.
  target_include_directories(jax_deepep_nvshmem SYSTEM PRIVATE "${ffi_include}")
  target_link_directories(jax_deepep_nvshmem PRIVATE "${nvshmem_dir}/lib")
  # The host library is found at run time through the preload in jax_deepep/gpu/low_latency.py.
  target_link_libraries(jax_deepep_nvshmem PRIVATE "${nvshmem_dir}/lib/libnvshmem_device.a" -l:libnvshmem_host.so.3)
  target_link_options(jax_deepep_nvshmem PRIVATE
    "LINKER:--version-script=${JAX_DEEPEP_SOURCE_ROOT}/cmake/jax_deepep_nvshmem.map")
  set_property(TARGET jax_deepep_nvshmem APPEND PROPERTY LINK_DEPENDS "${JAX_DEEPEP_SOURCE_ROOT}/cmake/jax_deepep_nvshmem.map")
  install(TARGETS jax_deepep_nvshmem LIBRARY DESTINATION jax_deepep/gpu)
  message(STATUS "jax_deepep: building libjax_deepep_nvshmem with NVSHMEM from ${nvshmem_dir}")
endfunction()

jax_deepep_add_nvshmem_library()
