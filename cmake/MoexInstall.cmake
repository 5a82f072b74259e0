# `cmake --install` of the libraries, their headers and a CMake package (lib/cmake/moex), so that another
# project can use moex with
#
#   find_package(moex REQUIRED)                 # CMAKE_PREFIX_PATH=<prefix>
#   target_link_libraries(app PRIVATE moex::runtime)
#
# Exported targets: moex::base (headers), moex::comm, moex::scheduler, moex::runtime, moex::blas (the
# CBLAS link of the static moex::runtime; see below) and, when built with CUDA, moex::comm_gpu and
# moex::cuda in their own export set (moexCudaTargets.cmake), which moexConfig.cmake loads when the
# consumer's CUDA toolkit is found (components `cuda` and `comm_gpu` make that a requirement).
# The tools go to bin/ (examples/CMakeLists.txt).
#
# Static libraries, as the build makes them: a consumer links the moex code it uses into its own
# binary and needs no run-time search path for moex. The price is that the libraries' private
# dependencies show up at the consumer's link step: moex_runtime's CBLAS (moex_blas) is exported as
# moex::blas over BLAS::BLAS, found again by find_dependency(BLAS) with the vendor moex was built with,
# so no path of this machine is baked into the package.
include(CMakePackageConfigHelpers)

set(MOEX_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/moex" CACHE STRING
    "Where moexConfig.cmake goes, relative to the install prefix")

set_target_properties(moex_base PROPERTIES EXPORT_NAME base)
set_target_properties(moex_comm PROPERTIES EXPORT_NAME comm)
set_target_properties(moex_scheduler PROPERTIES EXPORT_NAME scheduler)
set_target_properties(moex_runtime PROPERTIES EXPORT_NAME runtime)
set_target_properties(moex_blas PROPERTIES EXPORT_NAME blas)
install(TARGETS moex_base moex_comm moex_scheduler moex_runtime moex_blas
  EXPORT moexTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(EXPORT moexTargets NAMESPACE moex:: DESTINATION ${MOEX_INSTALL_CMAKEDIR})

# The public headers in their source layout under MOEX_INSTALL_INCLUDEDIR; those of the GPU path only
# when it is built (they include the CUDA and NCCL headers).
set(moex_header_excludes)
if(NOT MOEX_CUDA_ENABLED)
  list(APPEND moex_header_excludes PATTERN "cuda" EXCLUDE PATTERN "staged" EXCLUDE
       PATTERN "device_communicator.h" EXCLUDE PATTERN "cuda_check.h" EXCLUDE)
endif()
if(NOT MOEX_CUDA_ENABLED OR NOT NCCL_FOUND)
  list(APPEND moex_header_excludes PATTERN "nccl" EXCLUDE)
endif()
install(DIRECTORY base comm scheduler runtime
  DESTINATION ${MOEX_INSTALL_INCLUDEDIR}
  FILES_MATCHING PATTERN "*.h" ${moex_header_excludes})

set(MOEX_PACKAGE_WITH_CUDA OFF)
set(MOEX_PACKAGE_WITH_NCCL OFF)
if(MOEX_CUDA_ENABLED)
  set(MOEX_PACKAGE_WITH_CUDA ON)
  set_target_properties(moex_comm_gpu PROPERTIES EXPORT_NAME comm_gpu)
  set_target_properties(moex_cuda PROPERTIES EXPORT_NAME cuda)
  install(TARGETS moex_comm_gpu moex_cuda
    EXPORT moexCudaTargets
    ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
    LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
    RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
  install(EXPORT moexCudaTargets NAMESPACE moex:: DESTINATION ${MOEX_INSTALL_CMAKEDIR})
  if(NCCL_FOUND)
    set(MOEX_PACKAGE_WITH_NCCL ON)
    # moex::comm_gpu links NCCL::NCCL; the consumer finds it with the same module.
    install(FILES ${PROJECT_SOURCE_DIR}/cmake/FindNCCL.cmake DESTINATION ${MOEX_INSTALL_CMAKEDIR})
  endif()
endif()

set(MOEX_PACKAGE_BLA_VENDOR "${BLA_VENDOR}")
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/moexConfig.cmake.in
  ${PROJECT_BINARY_DIR}/moexConfig.cmake
  INSTALL_DESTINATION ${MOEX_INSTALL_CMAKEDIR}
  NO_SET_AND_CHECK_MACRO)
# 0.x: a minor version may break the API, so only the same major.minor is compatible.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/moexConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/moexConfig.cmake ${PROJECT_BINARY_DIR}/moexConfigVersion.cmake
  DESTINATION ${MOEX_INSTALL_CMAKEDIR})
