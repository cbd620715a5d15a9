# NativePeftCuda.cmake: compile kernels/*.cu to PTX and to a fatbin with nvcc custom commands.
#
# CMake 3.25 has no CUDA_FATBIN_COMPILATION, and enabling the CUDA language makes CMake test-compile
# with a host compiler nvcc 11.8 rejects (gcc 12), so we drive nvcc directly:
#   <stem>.ptx     -ptx for compute_80 (one architecture per -ptx; the driver JITs it for newer GPUs)
#   <stem>.fatbin  SASS for sm_80 and sm_90 plus compute_80 PTX, loaded first by CudaGpu
# nvcc 11.x needs a host compiler it accepts: clang-14 (or g++ <= 11); nvcc 12+ takes the default.

set(NATIVEPEFT_NVCC "" CACHE FILEPATH "nvcc used to build the PTX (empty: search PATH and /usr/local/cuda)")
set(NATIVEPEFT_CUDA_HOST_COMPILER "" CACHE STRING "host compiler for nvcc (empty: clang-14 for nvcc 11, default otherwise)")
set(NATIVEPEFT_PTX_ARCH "compute_80" CACHE STRING "virtual architecture of the PTX")
set(NATIVEPEFT_SASS_ARCHS "80;90" CACHE STRING "real architectures in the fatbin")

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
    add_custom_command(OUTPUT "${fatbin}"
      COMMAND "${nvcc}" ${common_flags} ${gencode} -fatbin "${cu}" -o "${fatbin}"
      DEPENDS "${cu}" ${headers}
      COMMENT "nvcc -fatbin ${stem}.cu (sm_${NATIVEPEFT_SASS_ARCHS} + ${NATIVEPEFT_PTX_ARCH})" VERBATIM)
    list(APPEND outputs "${ptx}" "${fatbin}")
  endforeach()
  add_custom_target(${K_TARGET} ALL DEPENDS ${outputs})
  set(NATIVEPEFT_HAVE_NVCC ON PARENT_SCOPE)
endfunction()
