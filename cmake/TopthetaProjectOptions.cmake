# Settings shared by every target this project builds for itself (tests, examples, benchmarks):
# warnings, -Werror, sanitizers, -march=native, the model data directory and the JSON reader.
# Never linked into toptheta::toptheta, so consumers of the library inherit none of it.
#
# Use: target_link_libraries(<own target> PRIVATE toptheta::toptheta toptheta_project_options)

add_library(toptheta_project_options INTERFACE)

target_compile_options(toptheta_project_options INTERFACE
  $<$<CXX_COMPILER_ID:GNU,Clang,AppleClang>:-Wall -Wextra -Wpedantic>
  $<$<CXX_COMPILER_ID:MSVC>:/W4 /permissive->)

if(TOPTHETA_WERROR)
  target_compile_options(toptheta_project_options INTERFACE
    $<$<CXX_COMPILER_ID:GNU,Clang,AppleClang>:-Werror>
    $<$<CXX_COMPILER_ID:MSVC>:/WX>)
endif()

if(TOPTHETA_SANITIZE)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    message(FATAL_ERROR "TOPTHETA_SANITIZE needs GCC or Clang (compiler is ${CMAKE_CXX_COMPILER_ID})")
  endif()
  set(_toptheta_sanitize_flags
    -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all)
  target_compile_options(toptheta_project_options INTERFACE ${_toptheta_sanitize_flags})
  target_link_options(toptheta_project_options INTERFACE ${_toptheta_sanitize_flags})
  # GCC's ASan instrumentation makes -Wmaybe-uninitialized fire falsely inside libstdc++
  # (std::function in <regex>, pulled in by Catch2; GCC PR 105616). The uninstrumented builds
  # keep the warning; this build is here to find real uninitialised reads at run time.
  target_compile_options(toptheta_project_options INTERFACE
    $<$<CXX_COMPILER_ID:GNU>:-Wno-maybe-uninitialized>)
endif()

if(TOPTHETA_NATIVE)
  target_compile_options(toptheta_project_options INTERFACE
    $<$<CXX_COMPILER_ID:GNU,Clang,AppleClang>:-march=native>)
  # GCC 12 warns falsely inside its own AVX-512 intrinsics as Eigen inlines them (GCC PR 105593).
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
    target_compile_options(toptheta_project_options INTERFACE -Wno-maybe-uninitialized -Wno-uninitialized)
  endif()
endif()

# Model data (models/stories260K, ...) used by tests and examples when it is present.
get_filename_component(_toptheta_shared_dir "${TOPTHETA_SHARED_DIR}" ABSOLUTE)
target_compile_definitions(toptheta_project_options INTERFACE
  TOPTHETA_SHARED_DIR="${_toptheta_shared_dir}")

# JSON reader for tests/examples that load reference data (e.g. reference-logits.json).
# The library itself never needs it.
find_package(nlohmann_json 3 QUIET)
if(nlohmann_json_FOUND)
  target_link_libraries(toptheta_project_options INTERFACE nlohmann_json::nlohmann_json)
  target_compile_definitions(toptheta_project_options INTERFACE TOPTHETA_HAVE_NLOHMANN_JSON=1)
endif()

# The kernel instantiations own programs share (cmake/kernel_instances.hpp), compiled once:
# toptheta_add_kernel_instances(<name> [<compile option>...]) makes an INTERFACE target <name>; a program that
# links it gets the header force-included (explicit instantiation declarations: its calls to those kernels
# compile to calls) and the objects of cmake/kernel_instances_*.cpp, built with the project's settings plus the
# options given. Those must be the program's own code-generation options: Eigen chooses its alignment, and with
# it how it allocates and frees, from the target architecture (-march), so objects built for another one cannot
# be mixed with the program's. toptheta_shared_kernels has the project's settings; the benchmarks, built
# -march=native, make their own. The fuzz targets use neither: libFuzzer must instrument the kernels they call.
file(GLOB _toptheta_kernel_instance_sources CONFIGURE_DEPENDS
     "${CMAKE_CURRENT_LIST_DIR}/kernel_instances_*.cpp")
set(_toptheta_kernel_instances_header "${CMAKE_CURRENT_LIST_DIR}/kernel_instances.hpp")
function(toptheta_add_kernel_instances name)
  add_library(${name}_objects OBJECT ${_toptheta_kernel_instance_sources})
  target_link_libraries(${name}_objects PRIVATE toptheta::toptheta toptheta_project_options)
  target_compile_options(${name}_objects PRIVATE ${ARGN})
  set_target_properties(${name}_objects PROPERTIES POSITION_INDEPENDENT_CODE ON)  # also in the Python module
  add_library(${name} INTERFACE)
  if(MSVC)
    target_compile_options(${name} INTERFACE "/FI${_toptheta_kernel_instances_header}")
  else()
    target_compile_options(${name} INTERFACE "SHELL:-include ${_toptheta_kernel_instances_header}")
  endif()
  target_sources(${name} INTERFACE $<TARGET_OBJECTS:${name}_objects>)
endfunction()
toptheta_add_kernel_instances(toptheta_shared_kernels)
