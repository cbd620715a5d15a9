#!/usr/bin/env bash
# NativePeft build script (Linux). See README.md.
#
#   ./build.sh run         set up, build, and run the main job (ends with `nativepeft compare`: the measured table, out/compare/)
#   ./build.sh test        set up, build, and run every test; ends with "N passed, N failed, N skipped"
#   ./build.sh build       set up and build (kernels + solution) only
#   ./build.sh pack        the NuGet packages in dist/: NativePeft (the library, its XML docs, the kernels, the built-in
#                          model) and NativePeft.Cli (the `nativepeft` .NET tool); docs/packaging.md
#   ./build.sh gpu-bundle  self-contained linux-x64 bundle (CLI + tests + PTX/fatbin + gpu-check) in dist/
#   ./build.sh gpu-check   run the CUDA tests and benchmarks from an unpacked bundle (no .NET SDK needed), each section
#                          under its own time limit, 8 minutes in all, ending with a summary (--dry-run: the plan)
#   ./build.sh gpu-check-selftest   gpu-check's section runner on fake sections (a timeout, a failure, a skip)
#   ./build.sh gpu-profile the memory targets (8B QLoRA 1x2048 <= 6 GiB, 70B QLoRA) and Nsight Systems / Compute on a
#                          Llama-3-8B-shaped step from an unpacked bundle (docs/profiling.md), 5 minutes in all;
#                          figures, CSVs and a summary in profile-results/
#
# Set-up is automatic on Debian/Ubuntu as root: cmake, a C++ compiler, OpenBLAS, and the CUDA toolkit
# (on Debian 12 nvcc 11.8 comes from nvidia-cuda-toolkit in the non-free component, which is enabled
# when missing; nvcc 11.8 needs clang-14 as host compiler). Without root or without a way to get nvcc,
# the CPU path still builds and runs, and one line says what was skipped and why.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
CONFIG="${NATIVEPEFT_CONFIG:-Release}"
KERNEL_OUT="$ROOT/build/kernels"
TFM=net10.0
log() { printf '[build.sh] %s\n' "$*" >&2; }
die() { printf '[build.sh] error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" = 0 ]; }
have() { command -v "$1" >/dev/null 2>&1; }
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

APT_UPDATED=0
apt_install() {
  local missing=()
  for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! is_root || ! have apt-get; then
    log "cannot install ${missing[*]}: not root or no apt-get"
    return 1
  fi
  if [ $APT_UPDATED = 0 ]; then
    log "apt-get update"
    apt-get update -qq >/dev/null || return 1
    APT_UPDATED=1
  fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Debian ships nvidia-cuda-toolkit in non-free: add a sources entry for contrib/non-free when missing.
enable_debian_nonfree() {
  grep -rqsE '^[^#]*\bnon-free\b' /etc/apt/sources.list /etc/apt/sources.list.d/ && return 0
  [ -r /etc/os-release ] && . /etc/os-release
  [ "${ID:-}" = debian ] || return 0   # Ubuntu: nvidia-cuda-toolkit is in multiverse, usually enabled
  local suite="${VERSION_CODENAME:-bookworm}"
  log "enabling Debian contrib/non-free for nvidia-cuda-toolkit"
  cat > /etc/apt/sources.list.d/nativepeft-nonfree.sources <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: $suite $suite-updates
Components: contrib non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  APT_UPDATED=0
}

find_nvcc() {
  if [ -n "${NATIVEPEFT_NVCC:-}" ]; then echo "$NATIVEPEFT_NVCC"; return; fi
  if have nvcc; then command -v nvcc; return; fi
  for d in /usr/local/cuda/bin ${CUDA_HOME:+$CUDA_HOME/bin}; do
    [ -x "$d/nvcc" ] && { echo "$d/nvcc"; return; }
  done
}

NVCC_SKIP_REASON=""
setup() {
  have dotnet || die "the .NET 10 SDK (dotnet) is required and was not found on PATH"
  apt_install cmake g++ make libopenblas-dev || have cmake || die "cmake is required: install cmake and a C++ compiler"
  NVCC="$(find_nvcc || true)"
  if [ -z "$NVCC" ] && [ "${NATIVEPEFT_NO_CUDA:-0}" != 1 ]; then
    if is_root && have apt-get; then
      enable_debian_nonfree
      apt_install nvidia-cuda-toolkit clang-14 || true
      NVCC="$(find_nvcc || true)"
      [ -z "$NVCC" ] && NVCC_SKIP_REASON="nvcc not installable through apt-get (nvidia-cuda-toolkit)"
    else
      NVCC_SKIP_REASON="nvcc not found and not root, so the CUDA toolkit could not be installed"
    fi
  elif [ -z "$NVCC" ]; then
    NVCC_SKIP_REASON="NATIVEPEFT_NO_CUDA=1"
  fi
  if [ -n "$NVCC" ]; then
    local ver; ver="$("$NVCC" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')"
    if [ "${ver:-0}" -lt 12 ] && ! have clang-14 && ! have g++-11; then
      apt_install clang-14 || true
    fi
  fi
}

build_kernels() {
  local args=(-S "$ROOT" -B "$ROOT/build/cmake" -DCMAKE_BUILD_TYPE=Release)
  if [ -n "${NVCC:-}" ]; then args+=(-DNATIVEPEFT_BUILD_PTX=ON -DNATIVEPEFT_NVCC="$NVCC"); else args+=(-DNATIVEPEFT_BUILD_PTX=OFF); fi
  cmake "${args[@]}" >"$ROOT/build/cmake-configure.log" 2>&1 || { cat "$ROOT/build/cmake-configure.log" >&2; die "cmake configure failed"; }
  if ! cmake --build "$ROOT/build/cmake" -j "$(nproc)" >"$ROOT/build/cmake-build.log" 2>&1; then
    cat "$ROOT/build/cmake-build.log" >&2
    die "kernel build failed (log: build/cmake-build.log)"
  fi
  if [ -n "${NVCC:-}" ]; then
    local n_cu n_ptx
    n_cu=$(ls "$ROOT"/kernels/*.cu 2>/dev/null | wc -l)
    n_ptx=$(ls "$KERNEL_OUT"/*.ptx 2>/dev/null | wc -l)
    log "kernels: $n_ptx PTX of $n_cu .cu files, fatbin for sm_80/sm_90, emulator library ($NVCC)"
  else
    log "skipped PTX/fatbin: $NVCC_SKIP_REASON (CPU and emulator paths are built)"
  fi
}

build_dotnet() {
  dotnet build "$ROOT/NativePeft.sln" -c "$CONFIG" -nologo -v quiet -clp:ErrorsOnly -clp:NoSummary >&2 || die "dotnet build failed"
}

build_all() {
  mkdir -p "$ROOT/build"
  setup
  build_kernels
  build_dotnet
}

cli() { dotnet "$ROOT/src/NativePeft.Cli/bin/$CONFIG/$TFM/NativePeft.Cli.dll" "$@"; }

# Runs the test executable, prints its output, and ends with "N passed, N failed, N skipped".
# Exit status: non-zero when a test failed or the run itself failed.
run_tests() {
  local exe="$1"; shift
  local results="$ROOT/build/test-results"
  rm -rf "$results"; mkdir -p "$results"
  set +e
  "$exe" --results-directory "$results" --report-trx --report-trx-filename tests.trx "$@" 2>&1 | tee "$results/console.txt"
  local rc=${PIPESTATUS[0]}
  set -e
  summarize_trx "$results/tests.trx" "$rc"
}

summarize_trx() {
  local trx="$1" rc="$2"
  if [ ! -f "$trx" ]; then echo "0 passed, 1 failed, 0 skipped"; return 1; fi
  local counters
  counters="$(grep -o '<Counters [^>]*>' "$trx" | head -1)"
  attr() { local v; v="$(echo "$counters" | sed -n "s/.* $1=\"\([0-9]*\)\".*/\1/p")"; echo "${v:-0}"; }
  local passed failed skipped
  passed=$(attr passed)
  failed=$(( $(attr failed) + $(attr error) + $(attr timeout) + $(attr aborted) ))
  skipped=$(attr notExecuted)
  # Every failed test with its message, and the skipped ones counted by reason, so a skip is never silent.
  awk '/<UnitTestResult / { name=""; out=""; if (match($0, /testName="[^"]*"/)) name=substr($0, RSTART+10, RLENGTH-11);
                            if ($0 ~ /outcome="NotExecuted"/) out="skipped"; else if ($0 ~ /outcome="Failed"/) out="FAILED" }
       /<Message>/ && out != "" { m=$0; sub(/.*<Message>/, "", m); sub(/<\/Message>.*/, "", m); m=substr(m, 1, 200);
                                  if (out == "FAILED") printf "  FAILED: %s: %s\n", name, m; else skips[m]++; out="" }
       END { for (m in skips) printf "  skipped: %d tests: %s\n", skips[m], m }' "$trx" | sort | head -60 || true
  if [ "$rc" != 0 ] && [ "$failed" = 0 ]; then failed=1; fi
  echo "$passed passed, $failed failed, $skipped skipped"
  [ "$failed" = 0 ]
}

cmd_test() {
  build_all
  if [ "${CI:-}" = true ] || [ "${NATIVEPEFT_REQUIRE_PTX:-0}" = 1 ]; then
    local missing=()
    for cu in "$ROOT"/kernels/*.cu; do
      local stem; stem="$(basename "$cu" .cu)"
      [ -s "$KERNEL_OUT/$stem.ptx" ] || missing+=("$stem.ptx")
    done
    [ ${#missing[@]} -eq 0 ] || { echo "0 passed, 1 failed, 0 skipped"; die "kernels did not compile to PTX: ${missing[*]} (${NVCC_SKIP_REASON:-nvcc failed})"; }
  fi
  # Every kernel the suite runs on the CPU emulator runs under its race checks (docs/attention.md).
  NATIVEPEFT_EMU_CHECKS="${NATIVEPEFT_EMU_CHECKS:-all}" \
    run_tests "$ROOT/tests/NativePeft.Tests/bin/$CONFIG/$TFM/NativePeft.Tests" "$@"
}

cmd_run() {
  build_all
  local out="$ROOT/out/run"
  cli info
  cli demo-checkpoint --out "$out/demo-model.safetensors"
  # --device auto: the kernels of kernels/nf4.cu on CUDA when present, else on the emulator.
  cli quantize --in "$out/demo-model.safetensors" --out "$out/demo-model-nf4.safetensors" --quant-type nf4 --blocksize 64 --double-quant --device auto
  cli bench --device auto
  # A training step of a random Llama: full fine-tuning, LoRA on a bf16 base, QLoRA on NF4 (fp32 compute, the CPU).
  cli bench --model tiny --device cpu
  # The main job, last so that its table ends the output: full fine-tuning, LoRA and QLoRA of the built-in model on
  # the built-in task from one seed, measured (docs/compare.md). A previous run's report is replaced.
  rm -rf "$ROOT/out/compare"
  cli compare --out "$ROOT/out/compare" "$@"
}

# The two packages, from the build just made (docs/packaging.md). A package made without nvcc has no PTX or fatbin.
cmd_pack() {
  build_all
  mkdir -p "$ROOT/dist"
  rm -f "$ROOT"/dist/NativePeft.*.nupkg
  local proj
  for proj in src/NativePeft/NativePeft.csproj src/NativePeft.Cli/NativePeft.Cli.csproj; do
    dotnet pack "$ROOT/$proj" -c "$CONFIG" --no-build -o "$ROOT/dist" -nologo -v quiet -clp:ErrorsOnly -clp:NoSummary >&2 || die "dotnet pack of $proj failed"
  done
  ls "$KERNEL_OUT"/*.ptx >/dev/null 2>&1 || log "the packages carry no PTX or fatbin: ${NVCC_SKIP_REASON:-nvcc made none} (CPU and emulator only)"
  local f
  for f in "$ROOT"/dist/NativePeft.*.nupkg; do log "package: dist/$(basename "$f") ($(( $(stat -c %s "$f") / 1024 / 1024 )) MiB)"; done
}

cmd_gpu_bundle() {
  build_all
  local stage="$ROOT/build/bundle/nativepeft-gpu"
  rm -rf "$ROOT/build/bundle"; mkdir -p "$stage" "$ROOT/dist"
  log "publishing self-contained linux-x64 (tests + CLI)"
  dotnet publish "$ROOT/tests/NativePeft.Tests/NativePeft.Tests.csproj" -c "$CONFIG" -r linux-x64 --self-contained \
    -p:NativePeftKernelDir="$KERNEL_OUT/" -o "$stage" -nologo -v quiet >&2 || die "publish of the tests failed"
  dotnet publish "$ROOT/src/NativePeft.Cli/NativePeft.Cli.csproj" -c "$CONFIG" -r linux-x64 --self-contained \
    -p:NativePeftKernelDir="$KERNEL_OUT/" -o "$stage" -nologo -v quiet >&2 || die "publish of the CLI failed"
  cp "$ROOT/build.sh" "$stage/build.sh"
  cp "$ROOT/tests/reference/bnb_crosscheck.py" "$stage/bnb_crosscheck.py"
  cp "$ROOT/tests/reference/peft_crosscheck.py" "$stage/peft_crosscheck.py"
  cp "$ROOT/tests/reference/gen_model_oracle.py" "$stage/gen_model_oracle.py"
  cp "$ROOT/tests/reference/attn_peer.py" "$stage/attn_peer.py"
  cp "$ROOT/tests/reference/train_peer.py" "$stage/train_peer.py"
  cp "$ROOT/tests/reference/compare_adapters.py" "$stage/compare_adapters.py"
  cat > "$stage/gpu-profile" <<'SH'
#!/usr/bin/env bash
# Nsight Systems and Nsight Compute on a Llama-3-8B-shaped training step (docs/profiling.md); results in profile-results/.
cd "$(dirname "$0")" && exec ./build.sh gpu-profile "$@"
SH
  chmod +x "$stage/gpu-profile"
  cat > "$stage/gpu-check" <<'SH'
#!/usr/bin/env bash
# Runs the CUDA tests and benchmarks from this bundle, each section under its own time limit (8 minutes in all);
# writes gpu-results.txt (everything), gpu-check-results.md and .json (the summary) next to it. --dry-run: the plan.
cd "$(dirname "$0")" && exec ./build.sh gpu-check "$@"
SH
  chmod +x "$stage/gpu-check" "$stage/build.sh"
  (cd "$ROOT/build/bundle" && tar -cJf "$ROOT/dist/nativepeft-gpu-linux-x64.tar.xz" nativepeft-gpu)
  local size; size=$(stat -c %s "$ROOT/dist/nativepeft-gpu-linux-x64.tar.xz")
  log "bundle: dist/nativepeft-gpu-linux-x64.tar.xz ($((size / 1024 / 1024)) MiB; unpacked $(du -sm "$stage" | cut -f1) MiB)"
  [ "$size" -le $((60 * 1024 * 1024)) ] || die "bundle is larger than 60 MiB"
}

# ---------------------------------------------------------------------------------------------------------------
# gpu-check: inside an unpacked bundle (no SDK, no network), everything that needs a GPU, and the benchmarks.
# One call that always finishes: each section runs under `timeout` with its own limit (the limits add up to at most
# GPU_CHECK_BUDGET seconds, 8 minutes, and no section runs past the budget), a failing or timed-out section never stops
# the rest, and the end is a summary table (section, status, seconds, headline figure) also written to
# gpu-check-results.md and gpu-check-results.json next to the full log (gpu-results.txt).
#
#   ./gpu-check [--dry-run] [--only s1,s2] [LOG]    (./build.sh gpu-check ... inside the bundle)
#
# A section is a function gc_<name> (dashes as underscores) run as `bash -c` under `timeout -k 5 LIMIT` (the whole
# process group is killed at the limit). It returns 0 (passed), GC_SKIP (77, skipped: gc_skip says why) or anything
# else (failed); it may leave a one-line headline figure with gc_headline. `./build.sh gpu-check-selftest` runs the
# runner on fake sections (one that sleeps past its limit, one past the budget) and checks the summary.
# ---------------------------------------------------------------------------------------------------------------
GPU_CHECK_BUDGET="${GPU_CHECK_BUDGET:-480}"   # seconds; an override is for trying the runner out
GC_SKIP=77
# name:limit seconds:what it runs. The limits add up to 460 s of the 480 s budget (the rest: kill grace and the summary).
# (The first H200 run, 2026-12-04, took about 15 s for the CUDA tests, 13 s for both model benches and 9 s for compare;
# tests and compare gave 10 s each to nccl; model-bench gave 10 s to compare when its default grew to 500 steps and
# it added two full-FT seeds.)
GPU_SECTIONS=(
  "env:10:nvidia-smi and nativepeft info"
  "tests:80:the CUDA-dependent tests (filter FullyQualifiedName~cuda|~Cuda|~Nccl; GPU_CHECK_TESTS_FILTER= runs all)"
  "kernel-bench:25:bench --device cuda: the 4-bit kernels and transformer ops against a device copy"
  "attention:35:bench --op attention --device cuda: ours, forward/backward TFLOP/s and decode GB/s"
  "attention-sdpa:40:attn_peer.py: PyTorch SDPA on the same shapes, then ours/SDPA per shape (python3 with torch)"
  "model-bench:20:bench --model small --device cuda --steps 5, bf16 with --profile, then fp32"
  "llama8b:100:bench --model llama3-8b --device cuda (LoRA and QLoRA, 4 x 1024, 3 timed steps), then train_peer.py (transformers + PEFT, python3 with torch, transformers, peft; QLoRA with bitsandbytes) on the same shape: ours/peer"
  "compare:40:compare --device cuda: full, LoRA and QLoRA on the built-in model (the main job), then full FT alone at seeds 1 and 2 (each >= 95 % exact match)"
  "generate:20:generate --device cuda with the LoRA adapter compare trained (KV cache), and without it"
  "nccl:20:train --nproc 1 --device cuda with NATIVEPEFT_DIST_BACKEND=nccl (a 1-rank job through the launcher) against the same run without --nproc: compare_adapters.py (python3, standard library)"
  "bnb:15:bnb_crosscheck.py: our 4-bit files against bitsandbytes' (python3 with torch, safetensors, bitsandbytes)"
  "peft:35:peft_crosscheck.py: our adapters and merges in transformers + PEFT and theirs here (python3 with torch, transformers, peft)"
  "oracle:20:gen_model_oracle.py: transformers + PEFT write the whole-model oracle into build/oracle/ (copy it to tests/NativePeft.Tests/Data/oracle/ and commit; python3 with torch, transformers, peft, safetensors)"
)

# A cross-check's Python libraries (issue 13: a missing one fails the section, it does not skip it): returns 0 when
# python3 imports them all; otherwise a skip only when every missing module is named in GPU_CHECK_OPTIONAL
# (space-separated, e.g. GPU_CHECK_OPTIONAL=bitsandbytes on a machine known to lack it), else a failure naming them.
gc_need_python() {
  local m missing=()
  have python3 || { echo "failed: python3 not found (needed: $*)"; gc_headline "python3 not found"; return 1; }
  for m in "$@"; do python3 -c "import $m" 2>/dev/null || missing+=("$m"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  for m in "${missing[@]}"; do
    case " ${GPU_CHECK_OPTIONAL:-} " in *" $m "*) ;; *) echo "failed: python3 lacks ${missing[*]} (install them, or name them in GPU_CHECK_OPTIONAL to skip)"; gc_headline "python3 lacks ${missing[*]}"; return 1 ;; esac
  done
  gc_skip "python3 lacks ${missing[*]} (allowed by GPU_CHECK_OPTIONAL)"
}

gc_headline() { printf '%s' "$*" | tr -d '\000-\037' | head -c 400 > "$GC_DIR/$GC_SECTION.headline"; }
gc_skip() { gc_headline "$*"; echo "skipped: $*"; return $GC_SKIP; }
# Cells of a Spectre table row (split on │, trimmed), for headlines: gc_cells FILE AWK-CONDITION 'print ...'
gc_cells() { awk -F'│|[|]' "{ for (i = 1; i <= NF; i++) gsub(/^ +| +\$/, \"\", \$i) } $2 { $3; exit }" "$1"; }

gc_env() {
  local rc=0 gpu
  if gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"; then
    echo "$gpu"
  else
    echo "nvidia-smi not available: $gpu"; gpu="no GPU: nvidia-smi not available"; rc=1
  fi
  ./NativePeft.Cli info 2>&1 || rc=1
  gc_headline "$(echo "$gpu" | head -1)"
  return $rc
}

# The CUDA-dependent tests (the fixtures run as "cuda" and the Cuda namespace; the filter is case-sensitive; CPU and emulator tests are CI's,
# and the whole suite does not fit the budget); GPU_CHECK_TESTS_FILTER="" runs every test, another value that filter.
gc_tests() {
  local log="$GC_DIR/tests.txt" rc line cuda stop filter="${GPU_CHECK_TESTS_FILTER-FullyQualifiedName~cuda|FullyQualifiedName~Cuda|FullyQualifiedName~Nccl}" args=()
  [ -n "$filter" ] && args+=(--filter "$filter")
  # The test runner's own --timeout, 30 s before the section's limit, still writes the TRX of what ran.
  stop=$(( ${GC_LIMIT:-0} - 30 ))
  [ "$stop" -ge 30 ] && args+=(--timeout "${stop}s")
  echo "test filter: ${filter:-none (every test)}"
  # Where nvidia-smi sees a GPU, an unavailable CUDA device or cuBLAS fails each CUDA test with its reason (no skips).
  local require=0
  nvidia-smi -L >/dev/null 2>&1 && require=1
  NATIVEPEFT_REQUIRE_CUDA=$require run_tests ./NativePeft.Tests "${args[@]}" 2>&1 | tee "$log"; rc=${PIPESTATUS[0]}
  line="$(summarize_trx "$ROOT/build/test-results/tests.trx" 0 2>/dev/null | tail -1)"
  cuda="$(grep -E '^  skipped: [0-9]+ tests: .*CUDA' "$log" | awk '{ n += $2 } END { print n + 0 }')"
  [ "$cuda" = 0 ] && cuda="" || cuda="; $cuda of them skipped for want of a CUDA device"
  # on a machine whose GPU nvidia-smi sees, a test skipped for want of a CUDA device is a failure (driver, cuBLAS, kernels)
  if [ -n "$cuda" ] && nvidia-smi -L >/dev/null 2>&1; then
    gc_headline "${line}${cuda} although nvidia-smi lists a GPU"
    return 1
  fi
  if grep -q "Canceling the test session" "$log"; then
    gc_headline "stopped by the runner's --timeout ${stop}s: ${line} before that${cuda}"
    return 124
  fi
  gc_headline "${line:-no TRX}${filter:+ ($filter)}${cuda}"
  return $rc
}

gc_kernel_bench() {
  local log="$GC_DIR/kernel-bench.txt" rc copy deq
  ./NativePeft.Cli bench --device cuda 2>&1 | tee "$log"; rc=${PIPESTATUS[0]}
  copy="$(gc_cells "$log" '$2 ~ /^copy bf16/' 'print $5')"
  deq="$(gc_cells "$log" '$2 == "dequantize_4bit_nf4_bf16"' 'print $5 " GB/s (" $6 " of copy)"')"
  [ -n "$copy" ] && gc_headline "copy ${copy} GB/s; dequantize nf4→bf16 ${deq:-?}"
  return $rc
}

gc_attention() {
  local log="$GC_DIR/attention.txt" rc fwd dec
  rm -f "$GC_DIR/attention-ours.json"
  ./NativePeft.Cli bench --op attention --device cuda --json "$GC_DIR/attention-ours.json" 2>&1 | tee "$log"; rc=${PIPESTATUS[0]}
  # the prefill table comes first, then the decode table (B, KV T, Hq/Hkv/D, ms, K+V MiB, GB/s, of copy)
  fwd="$(gc_cells "$log" '$2 == "1" && $3 == "4096"' 'print "fwd " $6 ", bwd " $8 " TFLOP/s"')"
  sed -n '/^ *decode: one query row/,$p' "$log" > "$log.decode"
  dec="$(gc_cells "$log.decode" '$2 == "8" && $3 == "4096"' 'print $7 " GB/s = " $8 " of copy"')"
  [ -n "$fwd" ] && gc_headline "B=1 T=4096: $fwd; decode B=8: ${dec:-?}"
  return $rc
}

gc_attention_sdpa() {
  local log="$GC_DIR/attention-sdpa.txt" ours="$GC_DIR/attention-ours.json" rc args head
  gc_need_python torch || return
  args=(--out "$GC_DIR/attention-sdpa.json")
  [ -s "$ours" ] && args+=(--ours "$ours") || echo "no figures of ours (the attention section did not finish): SDPA alone, default shapes"
  python3 ./attn_peer.py "${args[@]}" 2>&1 | tee "$log"; rc=${PIPESTATUS[0]}
  head="$(sed -n 's/^headline: //p' "$log" | tail -1)"
  [ -z "$head" ] && head="SDPA $(grep -m1 '^prefill B=1 T=4096 ' "$log" | sed 's/^prefill //')"
  gc_headline "$head"
  return $rc
}

gc_model_bench() {
  local log="$GC_DIR/model-bench.txt" rc=0 head="" p r
  for p in bf16 fp32; do
    local extra=(); [ $p = bf16 ] && extra=(--profile)
    ./NativePeft.Cli bench --model small --device cuda --precision $p --steps 5 "${extra[@]}" 2>&1 | tee "$log.$p"; r=${PIPESTATUS[0]}
    [ "$r" = 0 ] || { echo "model bench ($p) failed"; rc=$r; }
    local ms; ms="$(awk -F'│|[|]' '{ for (i = 1; i <= NF; i++) gsub(/^ +| +$/, "", $i) }
                 $2 ~ /^(full|lora|qlora)/ { split($2, m, " "); s = s (s ? ", " : "") m[1] " " $3 } END { if (s) print s " ms/step" }' "$log.$p")"
    [ -n "$ms" ] && head+="$p: $ms; "
  done
  [ -n "$head" ] && gc_headline "${head%; }"
  return $rc
}

# Llama-3-8B (all 32 layers, random weights made on the device), LoRA and QLoRA at batch 4 x 1024: ours, then the
# peer on the same shape and settings (train_peer.py reads them from ours' JSON); the headline is ours/peer. Ours runs
# under half the section's limit so that the peer always gets its turn.
gc_llama8b() {
  local log="$GC_DIR/llama8b.txt" ours="$GC_DIR/llama8b-ours.json" peer="$GC_DIR/llama8b-peer.json" rc=0 r head args
  rm -f "$ours" "$peer"
  timeout -k 5 $(( ${GC_LIMIT:-100} / 2 )) ./NativePeft.Cli bench --model llama3-8b --device cuda --batch 4 --seq 1024 --steps 3 \
    --json "$ours" 2>&1 | tee "$log"; r=${PIPESTATUS[0]}
  [ "$r" = 0 ] || { echo "ours: bench --model llama3-8b failed or timed out (exit $r)"; rc=$r; }
  head="ours $(awk -F'│|[|]' '{ for (i = 1; i <= NF; i++) gsub(/^ +| +$/, "", $i) }
               $2 ~ /^(lora|qlora)/ { split($2, m, " "); s = s (s ? ", " : "") m[1] " " $4 " tok/s" } END { print s }' "$log")"
  local need=0; gc_need_python torch transformers peft || need=$?
  if [ "$need" != 0 ]; then
    # No peer: a failure (ours alone is no comparison), unless the missing modules are allowed by GPU_CHECK_OPTIONAL.
    gc_headline "${head}; peer not run: python3 lacks torch, transformers or peft"
    [ "$need" = "$GC_SKIP" ] && return $rc
    return 1
  fi
  args=(--json "$peer" --steps 3)
  if [ -s "$ours" ]; then args+=(--ours "$ours"); else args+=(--model llama3-8b --batch 4 --seq 1024); echo "no figures of ours: the peer alone"; fi
  python3 ./train_peer.py "${args[@]}" 2>&1 | tee -a "$log"; r=${PIPESTATUS[0]}
  [ "$r" = 0 ] || { echo "peer: train_peer.py failed (exit $r)"; rc=$r; }
  local ratios; ratios="$(sed -n 's/^headline: //p' "$log" | tail -1)"
  gc_headline "${ratios:-$head}"
  return $rc
}

# compare's defaults on the device (docs/compare.md "The defaults"), then full fine-tuning alone at seeds 1 and 2, which
# the former defaults left at 59 % and 79 % exact match on the CPU (and seed 0 at 66 % on the first H200 run): each
# must reach 95 %, as CompareCliTests asserts on the CPU, so the device's seed sensitivity is measured, not assumed.
gc_compare() {
  local log="$GC_DIR/compare.txt" rc s r x seeds="" head
  rm -rf build/compare-cuda build/compare-cuda-seed*
  ./NativePeft.Cli compare --device cuda --out build/compare-cuda 2>&1 | tee "$log"; rc=${PIPESTATUS[0]}
  head="$(sed -n 's/^ *\(.*[^ ]\) *done in \([0-9.]*\) s.*/\1 \2 s/p' "$log" | awk '{ s = s (s ? ", " : "") $0 } END { print s ? "trained: " s : "" }')"
  for s in 1 2; do
    ./NativePeft.Cli compare --device cuda --methods full --seed $s --out "build/compare-cuda-seed$s" > "$GC_DIR/compare-seed$s.txt" 2>&1; r=$?
    x="$(sed -n 's/.*full FT *done in .*after eval loss [0-9.]*, exact match \([0-9.]*\) %.*/\1/p' "$GC_DIR/compare-seed$s.txt" | tail -1)"
    echo "full FT at seed $s: exit $r, exact match ${x:-?} %" | tee -a "$log"
    seeds="${seeds:+$seeds, }${x:-?} %"
    if [ "$r" != 0 ] || ! awk -v x="${x:-0}" 'BEGIN { exit !(x >= 95) }'; then rc=1; fi
  done
  gc_headline "${head:+$head; }full FT exact match at seeds 1, 2: $seeds"
  return $rc
}

gc_generate() {
  local log="$GC_DIR/generate.txt" rc=0 r adapter=build/compare-cuda/lora/adapter
  : > "$log"
  if [ -d "$adapter" ]; then
    ./NativePeft.Cli generate --device cuda --adapter "$adapter" --prompt $'upper: ajjgi\n' --max-tokens 12 2>&1 | tee -a "$log"
    r=${PIPESTATUS[0]}; [ "$r" = 0 ] || { echo "generate with the adapter failed"; rc=$r; }
  else
    echo "with the adapter: not run, compare left no $adapter"
  fi
  ./NativePeft.Cli generate --device cuda --prompt $'upper: ajjgi\n' --max-tokens 12 2>&1 | tee -a "$log"
  r=${PIPESTATUS[0]}; [ "$r" = 0 ] || { echo "generate without an adapter failed"; rc=$r; }
  local stats; stats="$(grep '^-- ' "$log" | sed 's/^-- //; s/, KV cache.*//' | paste -sd ';' -)"
  [ -d "$adapter" ] || stats="${stats:+$stats; }no adapter run: compare left none"
  gc_headline "$stats"
  return $rc
}

# Data-parallel training on NCCL with one GPU (docs/distributed.md): the built-in model's LoRA run, once plain and once
# as a 1-rank job through the launcher (`train --nproc 1`, the worker reading RANK/WORLD_SIZE/... and
# NATIVEPEFT_DIST_BACKEND=nccl): the adapters must agree (compare_adapters.py: every tensor within rtol 1e-3 of its
# largest value, "bit-identical" when they are). An explicit nccl backend makes a world of 1 run the data-parallel step
# over a 1-rank NCCL communicator (premultiplied bucket all-reduces on NCCL's stream, host collectives on its bootstrap),
# so this checks the training path through NCCL on one GPU; NCCL's own 1-rank checks are the tests section's
# (FullyQualifiedName~Nccl); two GPUs: docs/gpu-validation.md, "The next run".
gc_nccl() {
  local log="$GC_DIR/nccl.txt" dir=build/nccl-check r head
  local args=(train --model builtin --data builtin --device cuda --steps 5 --batch 4 --seq 64 --seed 3)
  rm -rf "$dir"; mkdir -p "$dir"; : > "$log"
  ./NativePeft.Cli "${args[@]}" --out "$dir/plain" 2>&1 | tee -a "$log"; r=${PIPESTATUS[0]}
  [ "$r" = 0 ] || { gc_headline "the plain run failed (exit $r)"; return "$r"; }
  NATIVEPEFT_DIST_BACKEND=nccl NATIVEPEFT_DIST_TIMEOUT=60 ./NativePeft.Cli "${args[@]}" --nproc 1 --out "$dir/nccl" 2>&1 | tee -a "$log"
  r=${PIPESTATUS[0]}
  [ "$r" = 0 ] || { gc_headline "train --nproc 1 (nccl) failed (exit $r): $(grep -E '^error' "$log" | head -1 | head -c 200)"; return "$r"; }
  if ! grep -q '^train: .*a job of 1 rank (the data-parallel step over nccl)' "$log"; then
    gc_headline "the --nproc 1 run did not train through NCCL: $(grep '^train: ' "$log" | tail -1 | head -c 200)"
    return 1
  fi
  have python3 || { gc_headline "both runs trained; python3 not found to compare the adapters"; return 1; }
  python3 ./compare_adapters.py "$dir/plain/adapter" "$dir/nccl/adapter" --rtol 1e-3 2>&1 | tee -a "$log"; r=${PIPESTATUS[0]}
  head="$(sed -n 's/^headline: //p' "$log" | tail -1)"
  gc_headline "launcher --nproc 1 (nccl) vs plain: ${head:-compare_adapters.py failed (exit $r)}"
  return "$r"
}

gc_bnb() {
  local log="$GC_DIR/bnb.txt" rc
  gc_need_python torch safetensors bitsandbytes || return
  python3 ./bnb_crosscheck.py "$PWD/NativePeft.Cli" "$PWD/build/bnb-crosscheck" 2>&1 | tee "$log"; rc=${PIPESTATUS[0]}
  gc_headline "$(grep -c '^PASS' "$log") PASS, $(grep -c '^FAIL' "$log") FAIL"
  return $rc
}

gc_peft() {
  local log="$GC_DIR/peft.txt" rc
  gc_need_python torch transformers peft safetensors || return
  rm -rf build/peft-crosscheck
  python3 ./peft_crosscheck.py "$PWD/NativePeft.Cli" "$PWD/builtin-model" "$PWD/build/peft-crosscheck" cuda 2>&1 | tee "$log"; rc=${PIPESTATUS[0]}
  gc_headline "$(grep -c '^PASS' "$log") PASS, $(grep -c '^FAIL' "$log") FAIL"
  return $rc
}

# The whole-model oracle TransformersOracleTests reads (logits and losses of a random bf16 two-shard Llama and of the
# built-in model, a PEFT adapter, merge_and_unload's checksums): written here, committed from here, compared in CI.
# transformers computes on the CPU in float32 (peft_crosscheck.py's reference too): no TF32, no CUDA start-up.
gc_oracle() {
  local log="$GC_DIR/oracle.txt" rc
  gc_need_python torch transformers peft safetensors || return
  python3 ./gen_model_oracle.py "$PWD/build/oracle" --device cpu --builtin "$PWD/builtin-model" 2>&1 | tee "$log"; rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then gc_headline "$(sed -n 's/^headline: //p' "$log" | tail -1)"
  else gc_headline "gen_model_oracle.py failed (exit $rc): $(tail -1 "$log")"; fi
  return $rc
}

gc_now_ms() { date +%s%3N; }
gc_json_str() { local s="$1"; s="${s//\\/\\\\}"; s="${s//\"/\\\"}"; printf '"%s"' "$s"; }

# Runs the sections of GPU_SECTIONS (those named in GC_ONLY when set) and writes the summary; the exit status is 1
# when a section failed or timed out (a skip is not a failure).
gc_run_all() {
  local budget="$1" t0 deadline entry name limit what fn rc status secs headline now remaining bad=0
  local results=()
  t0=$(gc_now_ms); deadline=$(( t0 + budget * 1000 ))
  export -f $(compgen -A function)
  export ROOT CONFIG TFM GC_DIR GC_SKIP
  for entry in "${GPU_SECTIONS[@]}"; do
    name="${entry%%:*}"; limit="${entry#*:}"; what="${limit#*:}"; limit="${limit%%:*}"
    if [ -n "${GC_ONLY:-}" ] && [[ ",$GC_ONLY," != *",$name,"* ]]; then continue; fi
    fn="gc_${name//-/_}"
    now=$(gc_now_ms); remaining=$(( (deadline - now) / 1000 ))
    if [ "$remaining" -lt "$limit" ]; then limit=$remaining; fi   # no section runs past the budget
    rm -f "$GC_DIR/$name.headline"
    echo
    echo "## $name (limit ${limit} s): $what"
    if [ "$remaining" -lt 5 ]; then
      status="skipped"; secs="0.0"; headline="only ${remaining} s of the ${budget} s budget left"
      echo "skipped: $headline"
    else
      local s0; s0=$(gc_now_ms)
      GC_SECTION="$name" GC_LIMIT="$limit" timeout -k 5 "$limit" bash -c "set -uo pipefail; $fn" </dev/null 2>&1 | tee "$GC_DIR/$name.log"
      rc=${PIPESTATUS[0]}
      secs="$(awk -v ms=$(( $(gc_now_ms) - s0 )) 'BEGIN { printf "%.1f", ms / 1000 }')"
      headline="$(cat "$GC_DIR/$name.headline" 2>/dev/null || true)"
      case "$rc" in
        0) status="passed" ;;
        "$GC_SKIP") status="skipped" ;;
        124|137) status="timed out"; bad=1
           # killed by timeout at the limit, or stopped earlier by its own clock (the test runner's --timeout)
           if [ "${secs%.*}" -ge "$limit" ]; then headline="killed at its ${limit} s limit${headline:+; before that: $headline}"; fi ;;
        *) status="failed"; bad=1
           # no headline of its own: the section's last error line (or last line) says why
           # the section's last error line (or, with no headline, its last line) says why
           local why; why="$( (grep -E '^(error|Error|FAIL)' "$GC_DIR/$name.log" || { [ -z "$headline" ] && grep -v '^ *$' "$GC_DIR/$name.log"; }) | tail -1 | tr -d '\000-\037' | head -c 300)"
           [ -n "$why" ] && [[ "$headline" != *"$why"* ]] && headline="${headline:+$headline; }$why"
           headline="exit $rc${headline:+; $headline}" ;;
      esac
    fi
    echo "-- $name: $status in $secs s${headline:+: $headline}"
    results+=("$name"$'\t'"$status"$'\t'"$secs"$'\t'"$limit"$'\t'"$headline")
  done
  local total; total="$(awk -v ms=$(( $(gc_now_ms) - t0 )) 'BEGIN { printf "%.1f", ms / 1000 }')"
  # The summary: a table here and in gpu-check-results.md, the same rows in gpu-check-results.json.
  {
    echo "# gpu-check summary"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname); $total s of the $budget s budget; overall: $([ $bad = 0 ] && echo passed || echo FAILED)"
    echo
    echo "| section | status | seconds | limit | headline |"
    echo "|---|---|---:|---:|---|"
    local row f
    for row in "${results[@]}"; do
      IFS=$'\t' read -r -a f <<< "$row"
      echo "| ${f[0]} | ${f[1]} | ${f[2]} | ${f[3]} | ${f[4]//|/\\|} |"
    done
  } > gpu-check-results.md
  {
    printf '{\n  "date": %s,\n  "host": %s,\n  "budget_s": %s,\n  "total_s": %s,\n  "passed": %s,\n  "sections": [\n' \
      "$(gc_json_str "$(date -u +%Y-%m-%dT%H:%M:%SZ)")" "$(gc_json_str "$(hostname)")" "$budget" "$total" "$([ $bad = 0 ] && echo true || echo false)"
    local i=0 n=${#results[@]}
    for row in "${results[@]}"; do
      IFS=$'\t' read -r -a f <<< "$row"
      i=$((i + 1))
      printf '    {"section": %s, "status": %s, "seconds": %s, "limit_s": %s, "headline": %s}%s\n' \
        "$(gc_json_str "${f[0]}")" "$(gc_json_str "${f[1]}")" "${f[2]}" "${f[3]}" "$(gc_json_str "${f[4]:-}")" "$([ $i -lt $n ] && echo ,)"
    done
    printf '  ]\n}\n'
  } > gpu-check-results.json
  echo
  cat gpu-check-results.md
  return $bad
}

gc_plan() {
  local entry name limit what sum=0
  echo "gpu-check plan: ${#GPU_SECTIONS[@]} sections, each under its own limit, within a ${GPU_CHECK_BUDGET} s budget"
  for entry in "${GPU_SECTIONS[@]}"; do
    name="${entry%%:*}"; limit="${entry#*:}"; what="${limit#*:}"; limit="${limit%%:*}"
    if [ -n "${GC_ONLY:-}" ] && [[ ",$GC_ONLY," != *",$name,"* ]]; then continue; fi
    sum=$((sum + limit))
    printf '  %-15s %4s s  %s\n' "$name" "$limit" "$what"
  done
  echo "  limits add up to $sum s"
  echo "here: nvidia-smi $(have nvidia-smi && echo found || echo 'not found'); python3 $(have python3 && echo found || echo 'not found');" \
       "python modules missing: $(m=""; for x in torch transformers peft safetensors bitsandbytes; do python3 -c "import $x" 2>/dev/null || m="$m $x"; done; echo "${m:- none}") (a cross-check missing one fails unless GPU_CHECK_OPTIONAL names it; GPU_CHECK_OPTIONAL=${GPU_CHECK_OPTIONAL:-});" \
       "bundle $([ -x ./NativePeft.Tests ] && echo 'here' || echo 'not here (run it inside the unpacked bundle)')"
  echo "results: the log (gpu-results.txt), gpu-check-results.md and gpu-check-results.json in $PWD"
}

cmd_gpu_check() {
  local out="gpu-results.txt" dry=0
  GC_ONLY=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) dry=1 ;;
      --only) shift; GC_ONLY="${1:-}" ;;
      --only=*) GC_ONLY="${1#--only=}" ;;
      -*) die "gpu-check: unknown option $1 (options: --dry-run, --only s1,s2, and the log file name)" ;;
      *) out="$1" ;;
    esac
    shift
  done
  if [ $dry = 1 ]; then gc_plan; return 0; fi
  [ -x ./NativePeft.Tests ] || die "gpu-check runs inside an unpacked bundle (./build.sh gpu-bundle makes one); --dry-run prints the plan"
  GC_DIR="$PWD/build/gpu-check"
  rm -rf "$GC_DIR"; mkdir -p "$GC_DIR"
  local status="$GC_DIR/overall-status"
  {
    echo "# NativePeft gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
    gc_plan
    if gc_run_all "$GPU_CHECK_BUDGET"; then echo 0 > "$status"; else echo 1 > "$status"; fi
  } 2>&1 | tee "$out"
  echo "results: $PWD/$out (everything), $PWD/gpu-check-results.md and .json (the summary)"
  [ "$(cat "$status" 2>/dev/null)" = 0 ]
}

# The runner on fake sections: one passes, one fails, one skips, one stops itself with 124 (the test runner's own
# --timeout), one sleeps past its limit (its child must die with it),
# one comes after the budget is spent. Checks the statuses, the timings and both results files.
cmd_gpu_check_selftest() {
  local dir fails=0 t0 elapsed rc
  dir="$(mktemp -d)"; cd "$dir"
  GC_DIR="$dir/build/gpu-check"; mkdir -p "$GC_DIR"
  GC_ONLY=""
  local marker="61.$$"
  gc_fake_pass() { echo "fake output"; gc_headline "42 widgets/s"; }
  gc_fake_fail() { echo "fake failure"; gc_headline "1 passed, 1 failed, 0 skipped"; return 3; }
  gc_fake_skip() { gc_skip "torch not installed"; }
  gc_fake_stopped() { gc_headline "stopped by its own --timeout: 5 passed before that"; return 124; }
  gc_fake_sleep() { gc_headline "started"; sleep "$GC_MARKER"; gc_headline "finished"; }
  gc_fake_late() { gc_headline "ran"; }
  export GC_MARKER="$marker"
  GPU_SECTIONS=("fake-pass:5:passes" "fake-fail:5:fails with exit 3" "fake-skip:5:skips" "fake-stopped:5:stops itself with 124"
                "fake-sleep:3:sleeps ${marker} s, past its 3 s limit"
                "fake-late:30:comes after the budget is spent")
  t0=$(gc_now_ms)
  rc=0
  gc_run_all 8 > "$dir/log.txt" 2>&1 || rc=$?
  elapsed=$(( $(gc_now_ms) - t0 ))
  cat "$dir/log.txt"
  check() { if eval "$2"; then echo "ok: $1"; else echo "FAILED: $1"; fails=$((fails + 1)); fi; }
  check "exit status 1 (a section failed)" '[ $rc = 1 ]'
  check "finished within 20 s (the sleeping section killed at 3 s)" '[ $elapsed -lt 20000 ]'
  gone() { local i; for i in 1 2 3 4 5 6 7 8 9 10; do pgrep -f "sleep $marker" >/dev/null || return 0; sleep 0.3; done; return 1; }
  check "the sleeping child process was killed with its section" gone
  check "fake-pass passed with its headline" 'grep -q "^| fake-pass | passed | [0-9.]* | 5 | 42 widgets/s |$" gpu-check-results.md'
  check "fake-fail failed with its exit code" 'grep -q "^| fake-fail | failed | .* | exit 3; 1 passed, 1 failed, 0 skipped |$" gpu-check-results.md'
  check "fake-skip skipped with the reason" 'grep -q "^| fake-skip | skipped | .* | torch not installed |$" gpu-check-results.md'
  check "fake-stopped timed out by its own clock, its headline as it is" 'grep -q "^| fake-stopped | timed out | [0-9.]* | 5 | stopped by its own --timeout: 5 passed before that |$" gpu-check-results.md'
  check "fake-sleep timed out, its partial headline kept" 'grep -q "^| fake-sleep | timed out | [0-9.]* | 3 | killed at its 3 s limit; before that: started |$" gpu-check-results.md'
  check "fake-late skipped: the budget was spent" 'grep -q "^| fake-late | skipped | 0.0 | .* | only -\?[0-9]* s of the 8 s budget left |$" gpu-check-results.md'
  check "the summary was printed" 'grep -q "^# gpu-check summary" log.txt && grep -q "overall: FAILED" log.txt'
  check "the JSON has the six sections" '[ $(grep -c "\"section\": " gpu-check-results.json) = 6 ] && grep -q "\"status\": \"timed out\"" gpu-check-results.json'
  if have python3; then check "the JSON parses" 'python3 -c "import json,sys; json.load(open(\"gpu-check-results.json\"))"'; fi
  if have python3; then
    check "a missing cross-check library fails its section" '( GC_SECTION=need gc_need_python json nativepeft_no_such_module >/dev/null ); [ $? = 1 ]'
    check "a missing library named in GPU_CHECK_OPTIONAL skips it" '( GC_SECTION=need GPU_CHECK_OPTIONAL="x nativepeft_no_such_module" gc_need_python json nativepeft_no_such_module >/dev/null ); [ $? = $GC_SKIP ]'
    check "present libraries pass" '( GC_SECTION=need gc_need_python json >/dev/null )'
  fi
  cd / && rm -rf "$dir"
  if [ $fails = 0 ]; then echo "gpu-check self-test: passed"; else echo "gpu-check self-test: $fails check(s) failed"; return 1; fi
}

# gpu-profile: inside an unpacked bundle on a GPU machine, first the memory targets (Llama-3-8B and -70B QLoRA at
# 1 x 2048 with recompute, the embedding on the host and paged AdamW: the pool's peak beside the plan and the driver's
# figure), then Nsight Systems over a Llama-3-8B-shaped step (4 layers, QLoRA,
# 4 x 1024: time per NVTX range and per kernel) and Nsight Compute over one launch of each kernel that matters (one
# layer), each under `timeout`, GPU_PROFILE_BUDGET seconds in all (300; ncu takes what is left). Writes profile-results/: nsys's CSVs, ncu's
# CSV per kernel, and summary.md (the ncu figures that say what limits each kernel). Tools missing or refused (no
# permission for the performance counters) are reported in the summary, never fatal. --dry-run prints the plan.
GPU_PROFILE_KERNELS=(attention_fwd_tc attention_bwd_dkdv_tc attention_bwd_dq_tc dequantize_4bit_dq_nf4_bf16 lora_down_tc_bf16 lora_bwd_input_tc_bf16 rmsnorm_backward_bf16 swiglu_backward_bf16)
cmd_gpu_profile() {
  local dry=0 budget="${GPU_PROFILE_BUDGET:-300}" out="$PWD/profile-results" nsys ncu start k left limit rc line t
  [ "${1:-}" = "--dry-run" ] && dry=1
  nsys="$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys 2>/dev/null | head -1 || true)"
  ncu="$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute*/ncu 2>/dev/null | head -1 || true)"
  local bench=(./NativePeft.Cli bench --model llama3-8b --method qlora --device cuda)
  # The memory targets first (issue 9): 8B QLoRA 1 x 2048 with recompute, the embedding on the host and paged AdamW
  # (plan 5.98 GiB; target <= 6.0 GiB), and 70B QLoRA on one GPU; the pool's peak, the plan and the driver's figure.
  local targets=("llama3-8b:75" "llama3-70b:110")
  if [ $dry = 1 ]; then
    echo "gpu-profile plan (${budget} s): memory targets ${targets[*]} (model:limit s: bench --method qlora --recompute --batch 1 --seq 2048 --optim paged-adamw --steps 2);"
    echo "  nsys ${nsys:-not found} over ${bench[*]} --layers 4 --steps 3 (60 s);"
    echo "  ncu ${ncu:-not found}, one launch each, --layers 1 --steps 1: ${GPU_PROFILE_KERNELS[*]} (the rest of the budget, 15 s at least each)"
    return 0
  fi
  [ -x ./NativePeft.Cli ] || die "gpu-profile runs inside an unpacked bundle (./build.sh gpu-bundle makes one); --dry-run prints the plan"
  rm -rf "$out"; mkdir -p "$out"; start=$(date +%s)
  {
    set +e   # a tool that fails or is refused is reported, never fatal
    echo "# gpu-profile $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1
    echo
    for t in "${targets[@]}"; do
      timeout -k 5 "${t#*:}" ./NativePeft.Cli bench --model "${t%%:*}" --method qlora --recompute --batch 1 --seq 2048 --optim paged-adamw \
        --steps 2 --device cuda --json "$out/${t%%:*}-qlora-1x2048.json" > "$out/${t%%:*}-qlora-1x2048.txt" 2>&1; rc=$?
      echo "## ${t%%:*} QLoRA 1 x 2048, recompute, embedding on the host, paged AdamW (exit $rc)"
      grep -E "qlora|peak|driver|not run" "$out/${t%%:*}-qlora-1x2048.txt" | head -6
    done
    echo
    if [ -n "$nsys" ]; then
      timeout -k 5 60 "$nsys" profile --trace=cuda,nvtx --sample=none --cpuctxsw=none -o "$out/step" --force-overwrite true \
        "${bench[@]}" --layers 4 --steps 3 > "$out/nsys.log" 2>&1; rc=$?
      echo "## nsys (exit $rc)"
      if [ -s "$out/step.nsys-rep" ]; then
        timeout 60 "$nsys" stats --report nvtx_sum,cuda_gpu_kern_sum --format csv --output "$out/step" "$out/step.nsys-rep" >> "$out/nsys.log" 2>&1
        for f in "$out"/step_*.csv; do [ -f "$f" ] && { echo "### $(basename "$f") (first rows)"; head -12 "$f"; }; done
      else
        echo "no report: $(tail -3 "$out/nsys.log" | tr '\n' ' ')"
      fi
    else
      echo "## nsys: not found (CUDA toolkit's nsys, or Nsight Systems)"
    fi
    echo
    for k in "${GPU_PROFILE_KERNELS[@]}"; do
      [ -n "$ncu" ] || { echo "## ncu: not found"; break; }
      left=$(( budget - ($(date +%s) - start) ))
      [ "$left" -lt 15 ] && { echo "## ncu $k: skipped, ${left} s of the budget left"; continue; }
      limit=$(( left < 30 ? left : 30 ))
      timeout -k 5 "$limit" "$ncu" -k "regex:$k" -c 1 --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section MemoryWorkloadAnalysis --csv --page details "${bench[@]}" --layers 1 --steps 1 > "$out/ncu-$k.csv" 2> "$out/ncu-$k.log"; rc=$?
      echo "## ncu $k (exit $rc)"
      line="$(grep -E '"(DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Duration|Registers Per Thread|Achieved Occupancy|Theoretical Occupancy)"' "$out/ncu-$k.csv" \
              | awk -F'","' '{ gsub(/"/, "", $NF); printf "%s: %s %s; ", $(NF-2), $NF, $(NF-1) }')"
      echo "${line:-no figures: $(grep -m2 -E 'ERR|error|==WARNING==' "$out/ncu-$k.log" "$out/ncu-$k.csv" | tr '\n' ' ')}"
    done
    echo
    echo "total: $(( $(date +%s) - start )) s of ${budget} s"
  } 2>&1 | tee "$out/summary.md"
}

case "${1:-}" in
  run) shift; cmd_run "$@" ;;
  test) shift; cmd_test "$@" ;;
  build) shift; build_all ;;
  pack) shift; cmd_pack ;;
  gpu-bundle) shift; cmd_gpu_bundle ;;
  gpu-check) shift; ROOT="$PWD"; cmd_gpu_check "$@" ;;
  gpu-check-selftest) shift; cmd_gpu_check_selftest ;;
  gpu-profile) shift; ROOT="$PWD"; cmd_gpu_profile "$@" ;;
  *) echo "usage: ./build.sh run | test | build | pack | gpu-bundle | gpu-check [--dry-run] [--only s1,s2] | gpu-check-selftest | gpu-profile [--dry-run]" >&2; exit 2 ;;
esac
