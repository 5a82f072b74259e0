# Finds the project's dependencies and records a one-line summary of each for the configure output.

find_package(Threads REQUIRED)
find_package(MPI REQUIRED COMPONENTS C)
find_package(Boost 1.74 REQUIRED)          # header-only: Asio
find_package(nlohmann_json 3.10 REQUIRED)

# BLAS with the CBLAS interface. OpenBLAS first (it ships cblas.h and cblas_* in one library).
if(NOT DEFINED BLA_VENDOR)
  set(BLA_VENDOR OpenBLAS)
endif()
find_package(BLAS REQUIRED)
find_path(MOEX_CBLAS_INCLUDE_DIR cblas.h
  PATHS /usr/include/x86_64-linux-gnu/openblas-pthread /usr/include/openblas /usr/include
  REQUIRED)
include(CheckSymbolExists)
set(CMAKE_REQUIRED_LIBRARIES ${BLAS_LIBRARIES})
set(CMAKE_REQUIRED_INCLUDES ${MOEX_CBLAS_INCLUDE_DIR})
check_symbol_exists(openblas_set_num_threads "cblas.h" MOEX_HAVE_OPENBLAS_API)
unset(CMAKE_REQUIRED_LIBRARIES)
unset(CMAKE_REQUIRED_INCLUDES)
# moex_blas: what moex_runtime (PRIVATE) and the tools link for CBLAS. It links FindBLAS's BLAS::BLAS
# rather than the paths in BLAS_LIBRARIES, so that once installed (exported as moex::blas: the static
# moex_runtime still needs it at the consumer's link step) it resolves through find_dependency(BLAS)
# in moexConfig.cmake instead of this machine's paths. cblas.h and the OpenBLAS-API switch only
# matter to moex's own sources, hence BUILD_INTERFACE.
add_library(moex_blas INTERFACE)
target_link_libraries(moex_blas INTERFACE BLAS::BLAS)
target_include_directories(moex_blas SYSTEM INTERFACE $<BUILD_INTERFACE:${MOEX_CBLAS_INCLUDE_DIR}>)
if(MOEX_HAVE_OPENBLAS_API)
  target_compile_definitions(moex_blas INTERFACE $<BUILD_INTERFACE:MOEX_HAVE_OPENBLAS_API=1>)
endif()
set(MOEX_BLAS_SUMMARY "${BLA_VENDOR}: ${BLAS_LIBRARIES} (cblas.h in ${MOEX_CBLAS_INCLUDE_DIR}, OpenBLAS API: ${MOEX_HAVE_OPENBLAS_API})")

# CUDA: AUTO turns it on when a CUDA compiler is found.
set(MOEX_CUDA_ENABLED OFF)
set(MOEX_CUDA_SUMMARY "no (MOEX_WITH_CUDA=${MOEX_WITH_CUDA})")
set(MOEX_NCCL_SUMMARY "no")
if(NOT MOEX_WITH_CUDA STREQUAL "OFF")
  if(NOT DEFINED CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(MOEX_CUDA_ENABLED ON)
    include(MoexCuda)
    find_package(CUDAToolkit)
    find_package(NCCL)
    set(MOEX_CUDA_SUMMARY "yes (${CMAKE_CUDA_COMPILER}; toolkit ${CUDAToolkit_VERSION}; architectures ${CMAKE_CUDA_ARCHITECTURES}; kernels in runtime/cuda)")
    if(NCCL_FOUND)
      set(MOEX_NCCL_SUMMARY "yes (${NCCL_LIBRARY})")
    else()
      set(MOEX_NCCL_SUMMARY "not found")
    endif()
  elseif(MOEX_WITH_CUDA STREQUAL "ON")
    message(FATAL_ERROR "MOEX_WITH_CUDA=ON but no CUDA compiler was found (set CMAKE_CUDA_COMPILER)")
  else()
    set(MOEX_CUDA_SUMMARY "no (no CUDA compiler found)")
  endif()
endif()
