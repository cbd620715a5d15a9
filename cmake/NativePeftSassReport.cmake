# NativePeftSassReport.cmake: the static profile of one kernels/*.cu for one real architecture, read from
# the SASS nvcc put in its fatbin (no second compile). One line per kernel:
#
#   kernel registers stack local spill_stores spill_loads instructions HMMA LDSM LDGSTS STL LDL BAR LDG128 STG128
#
#   registers, stack, local   cuobjdump -res-usage (REG, STACK, LOCAL)
#   spill_stores, spill_loads ptxas -v of the fatbin build (PTXAS_LOG), "-" when the log has no figures
#   instructions, HMMA ...    cuobjdump -sass: instructions per kernel, and those whose opcode is HMMA
#                             (mma.sync), LDSM (ldmatrix), LDGSTS (cp.async), STL/LDL (local memory:
#                             spills), BAR (bar.sync); predicated instructions count
#   LDG128, STG128            global loads / stores of 16 bytes (LDG/STG with a .128 modifier): the
#                             vectorized memory-bound kernels
#
#   cmake -DCUOBJDUMP=<cuobjdump> -DFATBIN=<f.fatbin> -DARCH=90 [-DPTXAS_LOG=<log>] -DOUT=<report> -P <this>
#   cmake -DSASS_FILE=<sass.txt> -DRES_FILE=<res.txt> -DARCH=90 [-DPTXAS_LOG=<log>] -DOUT=<report> -P <this>
#
# The second form reads saved cuobjdump output; tests/NativePeft.Tests/Kernels/KernelSassTests.cs runs it
# on hand-written SASS with a spill, to show that this script reports one.
if(NOT OUT OR NOT ARCH)
  message(FATAL_ERROR "NativePeftSassReport.cmake: OUT and ARCH are required")
endif()
set(opcodes HMMA LDSM LDGSTS STL LDL BAR)

if(SASS_FILE)
  file(READ "${SASS_FILE}" sass)
  file(READ "${RES_FILE}" res)
  set(source "${SASS_FILE}")
else()
  execute_process(COMMAND "${CUOBJDUMP}" -arch "sm_${ARCH}" -sass "${FATBIN}"
                  OUTPUT_VARIABLE sass ERROR_VARIABLE err RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "cuobjdump -sass ${FATBIN} failed: ${err}")
  endif()
  execute_process(COMMAND "${CUOBJDUMP}" -arch "sm_${ARCH}" -res-usage "${FATBIN}"
                  OUTPUT_VARIABLE res ERROR_VARIABLE err RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "cuobjdump -res-usage ${FATBIN} failed: ${err}")
  endif()
  get_filename_component(source "${FATBIN}" NAME)
endif()

# SASS: "Function : <name>" opens a kernel; an instruction line is "/*0a90*/  [@!UP0 ]OPCODE.modifiers ...".
# The encoding lines ("/* 0x... */") have a space after "/*" and do not match. The matches contain no ';'
# or '[', so they form a clean CMake list.
string(REGEX MATCHALL "Function : [A-Za-z0-9_$]+|/\\*[0-9a-f]+\\*/[ \t]+(@!?U?P[T0-9][ \t]+)?[A-Z][A-Z0-9_.]*"
       tokens "${sass}")
set(kernels "")
set(current "")
foreach(t IN LISTS tokens)
  if(t MATCHES "^Function : (.+)$")
    set(current "${CMAKE_MATCH_1}")
    list(APPEND kernels "${current}")
    set(ops_${current} "")
    set(full_${current} "")
  elseif(current)
    string(REGEX REPLACE "^.*[ \t]" "" full "${t}")
    string(REGEX REPLACE "\\..*$" "" op "${full}")
    list(APPEND ops_${current} "${op}")
    list(APPEND full_${current} "${full}")
  endif()
endforeach()

# -res-usage: " Function <name>:\n  REG:254 STACK:0 SHARED:1024 LOCAL:0 ..."
string(REGEX MATCHALL "Function [A-Za-z0-9_$]+:[ \t]*\n[^\n]*" res_entries "${res}")
foreach(e IN LISTS res_entries)
  if(e MATCHES "^Function ([A-Za-z0-9_$]+):")
    set(name "${CMAKE_MATCH_1}")
    foreach(key REG STACK LOCAL)
      set(${key}_${name} "-")
      if(e MATCHES "[ \t]${key}:([0-9]+)")
        set(${key}_${name} "${CMAKE_MATCH_1}")
      endif()
    endforeach()
  endif()
endforeach()

# ptxas -v, the sm_${ARCH} part: "Compiling entry function '<name>' for 'sm_90'", then "Function properties
# for <name>" followed by "<n> bytes stack frame, <s> bytes spill stores, <l> bytes spill loads".
# Properties of non-inlined device functions follow their own "Function properties for" line and are skipped.
if(PTXAS_LOG AND EXISTS "${PTXAS_LOG}")
  file(READ "${PTXAS_LOG}" log)
  string(REGEX MATCHALL "Compiling entry function '[^']+' for 'sm_[0-9a-z]+'|Function properties for [A-Za-z0-9_$]+|[0-9]+ bytes spill stores, [0-9]+ bytes spill loads"
         log_tokens "${log}")
  set(entry "")
  set(props "")
  foreach(t IN LISTS log_tokens)
    if(t MATCHES "^Compiling entry function '([^']+)' for 'sm_([0-9a-z]+)'")
      if(CMAKE_MATCH_2 STREQUAL "${ARCH}")
        set(entry "${CMAKE_MATCH_1}")
      else()
        set(entry "")
      endif()
      set(props "")
    elseif(t MATCHES "^Function properties for (.+)$")
      set(props "${CMAKE_MATCH_1}")
    elseif(entry AND props STREQUAL entry AND t MATCHES "^([0-9]+) bytes spill stores, ([0-9]+) bytes spill loads")
      set(SPST_${entry} "${CMAKE_MATCH_1}")
      set(SPLD_${entry} "${CMAKE_MATCH_2}")
    endif()
  endforeach()
endif()

set(text "# NativePeft static kernel profile: ${source}, sm_${ARCH}\n")
string(APPEND text "# generated at build time by cmake/NativePeftSassReport.cmake (cuobjdump -sass/-res-usage, ptxas -v); do not edit\n")
list(JOIN opcodes " " opcode_columns)
string(APPEND text "kernel registers stack local spill_stores spill_loads instructions ${opcode_columns} LDG128 STG128\n")
list(SORT kernels)
foreach(k IN LISTS kernels)
  set(line "${k}")
  foreach(v REG_${k} STACK_${k} LOCAL_${k} SPST_${k} SPLD_${k})
    if(DEFINED ${v})
      string(APPEND line " ${${v}}")
    else()
      string(APPEND line " -")
    endif()
  endforeach()
  list(LENGTH ops_${k} n)
  string(APPEND line " ${n}")
  foreach(op IN LISTS opcodes)
    set(matching ${ops_${k}})
    list(FILTER matching INCLUDE REGEX "^${op}$")
    list(LENGTH matching n)
    string(APPEND line " ${n}")
  endforeach()
  foreach(op LDG STG)
    set(matching ${full_${k}})
    list(FILTER matching INCLUDE REGEX "^${op}\\.(.*\\.)?128(\\..*)?$")
    list(LENGTH matching n)
    string(APPEND line " ${n}")
  endforeach()
  string(APPEND text "${line}\n")
endforeach()
file(WRITE "${OUT}" "${text}")
