# NativePeftCuda.cmake: compile kernels/*.cu to PTX and to a fatbin with nvcc custom commands.
#
# CMake 3.25 has no CUDA_FATBIN_COMPILATION, and enabling the CUDA language makes CMake test-compile
# with a host compiler nvcc 11.8 rejects (gcc 12), so we drive nvcc directly:
#   <stem>.ptx     -ptx for compute_80 (one architecture per -ptx; the driver JITs it for newer GPUs)
#   <stem>.fatbin  SASS for sm_80 and sm_90 plus compute_80 PTX, loaded first by CudaGpu
#   <stem>.sm90.txt the static profile of the sm_90 SASS in the fatbin, per kernel: registers, stack, spill
#                  stores/loads (ptxas -v of the fatbin build), HMMA/LDSM/LDGSTS/STL/LDL/BAR counts
#                  (cuobjdump); cmake/NativePeftSassReport.cmake, read by KernelSassTests. Not built
#                  without cuobjdump.
# nvcc 11.x needs a host compiler it accepts: clang-14 (or g++ <= 11); nvcc 12+ takes the default.

set(NATIVEPEFT_NVCC "" CACHE FILEPATH "nvcc used to build the PTX (empty: search PATH and /usr/local/cuda)")
set(NATIVEPEFT_CUDA_HOST_COMPILER "" CACHE STRING "host compiler for nvcc (empty: clang-14 for nvcc 11, default otherwise)")
set(NATIVEPEFT_PTX_ARCH "compute_80" CACHE STRING "virtual architecture of the PTX")
set(NATIVEPEFT_SASS_ARCHS "80;90" CACHE STRING "real architectures in the fatbin")
set(NATIVEPEFT_REPORT_ARCH "90" CACHE STRING "real architecture of the <stem>.sm<arch>.txt SASS reports (one of NATIVEPEFT_SASS_ARCHS)")

set(NATIVEPEFT_CMAKE_DIR "${CMAKE_CURRENT_LIST_DIR}")

function(nativepeft_find_nvcc out_var)
  if(NATIVEPEFT_NVCC)
    set(${out_var} "${NATIVEPEFT_NVCC}" PARENT_SCOPE)
    return()
  endif()
  find_program(_np_nvcc nvcc HINTS ENV CUDA_HOME ENV CUDA_PATH PATH_SUFFIXES bin
               PATHS /usr/local/cuda/bin /usr/bin)
  set(${out_var} "${_np_nvcc}" PARENT_SCOPE)
endfunction()

# nativepeft_add_kernels(TARGET <name> SOURCES <.cu...> OUTPUT_DIR <dir> INCLUDE_DIR <dir>)
function(nativepeft_add_kernels)
  cmake_parse_arguments(K "" "TARGET;OUTPUT_DIR;INCLUDE_DIR" "SOURCES" ${ARGN})
  nativepeft_find_nvcc(nvcc)
  if(NOT nvcc)
    message(STATUS "NativePeft: nvcc not found: PTX and fatbin are not built (CPU and emulator paths still are)")
    set(NATIVEPEFT_HAVE_NVCC OFF PARENT_SCOPE)
    return()
  endif()
  execute_process(COMMAND "${nvcc}" --version OUTPUT_VARIABLE nvcc_version_text)
  string(REGEX MATCH "release ([0-9]+)\\.([0-9]+)" _m "${nvcc_version_text}")
  set(nvcc_major "${CMAKE_MATCH_1}")
  set(host_flags "")
  set(host "${NATIVEPEFT_CUDA_HOST_COMPILER}")
  if(NOT host AND nvcc_major LESS 12)
    find_program(_np_clang14 clang-14)
    find_program(_np_gxx11 g++-11)
    if(_np_clang14)
      set(host "${_np_clang14}")
    elseif(_np_gxx11)
      set(host "${_np_gxx11}")
    else()
      message(WARNING "NativePeft: nvcc ${nvcc_major} needs clang-14 or g++-11 as host compiler; none found")
    endif()
  endif()
  if(host)
    set(host_flags -ccbin "${host}")
  endif()
  message(STATUS "NativePeft: nvcc ${nvcc} (release ${CMAKE_MATCH_1}.${CMAKE_MATCH_2}) host compiler: ${host}")

  # cuobjdump comes with nvcc; look next to it first.
  get_filename_component(nvcc_dir "${nvcc}" DIRECTORY)
  find_program(_np_cuobjdump cuobjdump HINTS "${nvcc_dir}" ENV CUDA_HOME ENV CUDA_PATH PATH_SUFFIXES bin
               PATHS /usr/local/cuda/bin /usr/bin)
  set(report_arch "${NATIVEPEFT_REPORT_ARCH}")
  if(NOT _np_cuobjdump)
    message(STATUS "NativePeft: cuobjdump not found: no SASS reports (<stem>.sm${report_arch}.txt)")
    set(report_arch "")
  elseif(NOT report_arch IN_LIST NATIVEPEFT_SASS_ARCHS)
    message(STATUS "NativePeft: sm_${report_arch} is not in NATIVEPEFT_SASS_ARCHS: no SASS reports")
    set(report_arch "")
  endif()

  set(gencode "")
  foreach(sm IN LISTS NATIVEPEFT_SASS_ARCHS)
    list(APPEND gencode -gencode "arch=compute_${sm},code=sm_${sm}")
  endforeach()
  string(REPLACE "compute_" "" ptx_sm "${NATIVEPEFT_PTX_ARCH}")
  list(APPEND gencode -gencode "arch=${NATIVEPEFT_PTX_ARCH},code=${NATIVEPEFT_PTX_ARCH}")

  # No --use_fast_math: the kernels keep IEEE results so they agree with the emulator and CpuOps.
  set(common_flags ${host_flags} -std=c++17 -O3 -Werror all-warnings -I "${K_INCLUDE_DIR}")

  set(outputs "")
  foreach(cu IN LISTS K_SOURCES)
    get_filename_component(stem "${cu}" NAME_WE)
    set(ptx "${K_OUTPUT_DIR}/${stem}.ptx")
    set(fatbin "${K_OUTPUT_DIR}/${stem}.fatbin")
    file(GLOB headers "${K_INCLUDE_DIR}/*.cuh" "${K_INCLUDE_DIR}/*.h")
    add_custom_command(OUTPUT "${ptx}"
      COMMAND "${nvcc}" ${common_flags} -arch=${NATIVEPEFT_PTX_ARCH} -ptx "${cu}" -o "${ptx}"
      DEPENDS "${cu}" ${headers}
      COMMENT "nvcc -ptx ${stem}.cu (${NATIVEPEFT_PTX_ARCH})" VERBATIM)
    # -Xptxas -v: registers, stack frame and spill bytes per kernel and architecture, kept in a log (not
    # printed) for the SASS report.
    set(ptxas_log "${CMAKE_CURRENT_BINARY_DIR}/ptxas/${stem}.ptxas.log")
    add_custom_command(OUTPUT "${fatbin}" "${ptxas_log}"
      COMMAND "${CMAKE_COMMAND}" -E make_directory "${CMAKE_CURRENT_BINARY_DIR}/ptxas"
      COMMAND "${CMAKE_COMMAND}" "-DLOG=${ptxas_log}" -P "${NATIVEPEFT_CMAKE_DIR}/NativePeftRunLogged.cmake" --
              "${nvcc}" ${common_flags} ${gencode} -Xptxas -v -fatbin "${cu}" -o "${fatbin}"
      DEPENDS "${cu}" ${headers} "${NATIVEPEFT_CMAKE_DIR}/NativePeftRunLogged.cmake"
      COMMENT "nvcc -fatbin ${stem}.cu (sm_${NATIVEPEFT_SASS_ARCHS} + ${NATIVEPEFT_PTX_ARCH})" VERBATIM)
    list(APPEND outputs "${ptx}" "${fatbin}")
    if(report_arch)
      set(report "${K_OUTPUT_DIR}/${stem}.sm${report_arch}.txt")
      add_custom_command(OUTPUT "${report}"
        COMMAND "${CMAKE_COMMAND}" "-DCUOBJDUMP=${_np_cuobjdump}" "-DFATBIN=${fatbin}" "-DARCH=${report_arch}"
                "-DPTXAS_LOG=${ptxas_log}" "-DOUT=${report}" -P "${NATIVEPEFT_CMAKE_DIR}/NativePeftSassReport.cmake"
        DEPENDS "${fatbin}" "${ptxas_log}" "${NATIVEPEFT_CMAKE_DIR}/NativePeftSassReport.cmake"
        COMMENT "SASS report ${stem}.sm${report_arch}.txt (cuobjdump)" VERBATIM)
      list(APPEND outputs "${report}")
    endif()
  endforeach()
  add_custom_target(${K_TARGET} ALL DEPENDS ${outputs})
  set(NATIVEPEFT_HAVE_NVCC ON PARENT_SCOPE)
endfunction()
