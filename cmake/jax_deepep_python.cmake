# What both CUDA libraries take from the Python that builds them: they are Python extension
# modules (pybind11, from its pip package) and their FFI handlers use the XLA FFI headers that
# ship inside jaxlib. Included by the root CMakeLists.txt before the libraries.

find_package(Python COMPONENTS Interpreter Development.Module REQUIRED)

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import pybind11; print(pybind11.get_cmake_dir())"
  OUTPUT_VARIABLE pybind11_DIR
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE pybind11_missing)
if(pybind11_missing)
  message(FATAL_ERROR "jax_deepep: pybind11 is not importable with ${Python_EXECUTABLE} (pip install pybind11)")
endif()
find_package(pybind11 CONFIG REQUIRED)

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import jax.ffi; print(jax.ffi.include_dir())"
  OUTPUT_VARIABLE JAX_FFI_INCLUDE_DIR
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE jax_missing)
if(jax_missing OR NOT EXISTS "${JAX_FFI_INCLUDE_DIR}/xla/ffi/api/ffi.h")
  message(FATAL_ERROR "jax_deepep: the XLA FFI headers were not found (jax.ffi.include_dir() with "
                      "${Python_EXECUTABLE}); install jax first")
endif()
message(STATUS "jax_deepep: XLA FFI headers in ${JAX_FFI_INCLUDE_DIR}")

# An extension module of the package: named `.so` (not Python's tagged suffix) so that import
# finds it and JAX_DEEPEP_LIBRARY / JAX_DEEPEP_NVSHMEM_LIBRARY can name the build output alike;
# only the module init symbol is exported (`map`: the version script), so C++ template code of
# the FFI headers never interposes on jaxlib's own copies (that crashed XLA's compiler once).
function(jax_deepep_add_module name map)
  pybind11_add_module(${name} MODULE NO_EXTRAS ${ARGN})
  set_target_properties(${name} PROPERTIES PREFIX "" SUFFIX ".so" CXX_STANDARD 17 CUDA_STANDARD 17
                                           POSITION_INDEPENDENT_CODE ON CUDA_RUNTIME_LIBRARY Static)
  target_include_directories(${name} PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}")
  # The FFI headers do not compile warning-free: SYSTEM keeps their warnings out of our build log.
  target_include_directories(${name} SYSTEM PRIVATE "${JAX_FFI_INCLUDE_DIR}")
  target_link_options(${name} PRIVATE "LINKER:--version-script=${CMAKE_CURRENT_SOURCE_DIR}/${map}")
  set_property(TARGET ${name} APPEND PROPERTY LINK_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/${map}")
  install(TARGETS ${name} LIBRARY DESTINATION jax_deepep/gpu)
endfunction()
