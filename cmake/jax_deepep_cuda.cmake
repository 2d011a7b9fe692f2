# The CUDA library of the normal (intranode) mode: kernels (cuda/) plus XLA FFI handlers and host
# runtime (xla_ffi/), one shared library installed next to jax_deepep/gpu/library.py, which loads it.
# (The low-latency NVSHMEM kernels build into their own library, cmake/jax_deepep_nvshmem.cmake.)
# Included by the root CMakeLists.txt once a CUDA compiler was found and enabled.

find_package(CUDAToolkit REQUIRED)
find_package(Python COMPONENTS Interpreter REQUIRED)

# The XLA FFI headers ship inside jaxlib.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import jax.ffi; print(jax.ffi.include_dir())"
  OUTPUT_VARIABLE JAX_FFI_INCLUDE_DIR
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE JAX_FFI_FOUND)
if(NOT JAX_FFI_FOUND EQUAL 0 OR NOT EXISTS "${JAX_FFI_INCLUDE_DIR}/xla/ffi/api/ffi.h")
  message(FATAL_ERROR "jax_deepep: the XLA FFI headers were not found (jax.ffi.include_dir() with "
                      "${Python_EXECUTABLE}); install jax first")
endif()
message(STATUS "jax_deepep: XLA FFI headers in ${JAX_FFI_INCLUDE_DIR}")

set(JAX_DEEPEP_CUDA_SOURCES
  cuda/layout.cu
  cuda/intranode_dispatch.cu
  cuda/intranode_combine.cu
  xla_ffi/intranode_ffi.cc
  xla_ffi/runtime.cc)

add_library(jax_deepep_cuda SHARED ${JAX_DEEPEP_CUDA_SOURCES})
set_target_properties(jax_deepep_cuda PROPERTIES
  OUTPUT_NAME jax_deepep_cuda
  CUDA_ARCHITECTURES 90            # sm_90 machine code + compute_90 PTX
  CUDA_STANDARD 17
  CXX_STANDARD 17
  CUDA_SEPARABLE_COMPILATION OFF
  POSITION_INDEPENDENT_CODE ON
  CXX_VISIBILITY_PRESET hidden
  CUDA_VISIBILITY_PRESET hidden
  CUDA_RUNTIME_LIBRARY Static)
target_include_directories(jax_deepep_cuda PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
# The FFI headers are for the host compiler only (handlers are .cc files); as SYSTEM headers
# their warnings stay out of our build log.
target_include_directories(jax_deepep_cuda SYSTEM PRIVATE ${JAX_FFI_INCLUDE_DIR})
target_compile_options(jax_deepep_cuda PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-O3 -lineinfo -Xcompiler=-fvisibility=hidden>
  $<$<COMPILE_LANGUAGE:CXX>:-O2 -Wall>)
target_link_libraries(jax_deepep_cuda PRIVATE CUDA::cudart_static)
target_link_options(jax_deepep_cuda PRIVATE
  "LINKER:--version-script=${CMAKE_CURRENT_SOURCE_DIR}/cmake/jax_deepep_cuda.map")
set_property(TARGET jax_deepep_cuda APPEND PROPERTY LINK_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/cmake/jax_deepep_cuda.map)

install(TARGETS jax_deepep_cuda LIBRARY DESTINATION jax_deepep/gpu)
