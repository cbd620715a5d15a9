# NativePeftRunLogged.cmake: run a command and keep its output (stdout + stderr) in a file.
#
#   cmake -DLOG=<file> -P NativePeftRunLogged.cmake -- <command> <args...>
#
# Used for the fatbin nvcc run with -Xptxas -v: ptxas' per-kernel figures (registers, stack frame, spill
# stores/loads) go to LOG for NativePeftSassReport.cmake instead of the build output. On failure the
# output is printed and the script fails, so compiler errors still show in the build log.
set(cmd "")
set(seen_sep OFF)
math(EXPR last "${CMAKE_ARGC} - 1")
foreach(i RANGE ${last})
  if(seen_sep)
    list(APPEND cmd "${CMAKE_ARGV${i}}")
  elseif(CMAKE_ARGV${i} STREQUAL "--")
    set(seen_sep ON)
  endif()
endforeach()
if(NOT LOG OR NOT cmd)
  message(FATAL_ERROR "usage: cmake -DLOG=<file> -P NativePeftRunLogged.cmake -- <command> <args...>")
endif()
execute_process(COMMAND ${cmd} OUTPUT_VARIABLE out ERROR_VARIABLE out RESULT_VARIABLE rc)
file(WRITE "${LOG}" "${out}")
if(NOT rc EQUAL 0)
  message("${out}")
  list(JOIN cmd " " cmd_text)
  message(FATAL_ERROR "command failed (${rc}): ${cmd_text}")
endif()
