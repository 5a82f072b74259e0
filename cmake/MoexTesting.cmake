# One helper for every test binary.
#
#   moex_add_test(NAME name SOURCES a.cpp ... [LIBS ...] [RANKS 1 2 3 4] [LABELS ...] [TIMEOUT s])
#
# Without RANKS the binary runs once as a plain process. With RANKS it links the MPI-aware test main
# and runs under `mpiexec -np N` for each N (test name NAME_npN); it passes only if every rank passes.
# Either main exits 77 (ctest: skipped) when tests skipped for want of a CUDA device and none failed
# (tests/device_skips.h).
set(MOEX_MPIEXEC_ENV
  "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1;OMPI_MCA_btl_vader_single_copy_mechanism=none;MOEX_TIMEOUT_S=60;OPENBLAS_NUM_THREADS=1")

function(moex_add_test)
  cmake_parse_arguments(T "" "NAME;TIMEOUT" "SOURCES;LIBS;RANKS;LABELS" ${ARGN})
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 300)
  endif()
  add_executable(${T_NAME} ${T_SOURCES})
  moex_target_defaults(${T_NAME})
  target_link_libraries(${T_NAME} PRIVATE ${T_LIBS} GTest::gtest)
  set_target_properties(${T_NAME} PROPERTIES RUNTIME_OUTPUT_DIRECTORY "${CMAKE_BINARY_DIR}/tests")
  if(T_RANKS)
    target_sources(${T_NAME} PRIVATE "${PROJECT_SOURCE_DIR}/tests/mpi_test_main.cpp")
    target_link_libraries(${T_NAME} PRIVATE moex::comm)
    foreach(n IN LISTS T_RANKS)
      add_test(NAME ${T_NAME}_np${n}
               COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${n} ${MPIEXEC_PREFLAGS}
                       $<TARGET_FILE:${T_NAME}> ${MPIEXEC_POSTFLAGS})
      set_tests_properties(${T_NAME}_np${n} PROPERTIES
        ENVIRONMENT "${MOEX_MPIEXEC_ENV}" TIMEOUT ${T_TIMEOUT} LABELS "mpi;${T_LABELS}"
        PROCESSORS ${n} SKIP_RETURN_CODE 77)
    endforeach()
  else()
    target_sources(${T_NAME} PRIVATE "${PROJECT_SOURCE_DIR}/tests/test_main.cpp")
    add_test(NAME ${T_NAME} COMMAND ${T_NAME})
    set_tests_properties(${T_NAME} PROPERTIES TIMEOUT ${T_TIMEOUT} LABELS "unit;${T_LABELS}"
      ENVIRONMENT "OPENBLAS_NUM_THREADS=1" SKIP_RETURN_CODE 77)
  endif()
endfunction()
