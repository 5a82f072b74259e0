# The CUDA language and the defaults of the GPU path. Included from MoexDependencies.cmake once a CUDA
# compiler has been found (MOEX_CUDA_ENABLED).
#
#   CMAKE_CUDA_ARCHITECTURES  default 90: sm_90 SASS plus compute_90 PTX (H100/H200). One architecture
#                             keeps nvcc time modest; pass -DCMAKE_CUDA_ARCHITECTURES=... to change it.
#   CMAKE_CUDA_STANDARD       20, like the C++ code.
#
# moex_cuda_target_defaults(target): C++20 and the project's warnings for a target's CUDA sources
# (-Wall -Wextra through the host compiler; nvcc's own warnings are on by default) and the public
# compile definition MOEX_WITH_CUDA_BUILD=1, so every target linking a CUDA library sees it.

if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
  set(CMAKE_CUDA_ARCHITECTURES 90 CACHE STRING "CUDA architectures (default 90: sm_90 SASS + compute_90 PTX)")
endif()
enable_language(CUDA)
# After enable_language: CMake's own compiler checks must not run with the dialect flag.
if(NOT DEFINED CMAKE_CUDA_STANDARD)
  set(CMAKE_CUDA_STANDARD 20)
endif()
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
set(CMAKE_CUDA_EXTENSIONS OFF)
# CMake < 3.26 does not know nvcc's C++20 flag (nvcc >= 12 has it).
if(NOT DEFINED CMAKE_CUDA20_STANDARD_COMPILE_OPTION AND CMAKE_CUDA_COMPILER_ID STREQUAL "NVIDIA"
   AND CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.0)
  set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
  set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
endif()

function(moex_cuda_target_defaults target)
  set_target_properties(${target} PROPERTIES CUDA_STANDARD 20 CUDA_STANDARD_REQUIRED ON)
  target_compile_definitions(${target} PUBLIC MOEX_WITH_CUDA_BUILD=1)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra,-Wno-unused-parameter>)
endfunction()
