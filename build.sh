#!/usr/bin/env bash
# NativePeft build script (Linux). See README.md.
#
#   ./build.sh run         set up, build, and run the main job (ends with `nativepeft compare`: the measured table, out/compare/)
#   ./build.sh test        set up, build, and run every test; ends with "N passed, N failed, N skipped"
#   ./build.sh build       set up and build (kernels + solution) only
#   ./build.sh gpu-bundle  self-contained linux-x64 bundle (CLI + tests + PTX/fatbin + gpu-check) in dist/
#   ./build.sh gpu-check   run the CUDA tests and kernel benchmarks from an unpacked bundle (no .NET SDK needed)
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
  cat > "$stage/gpu-check" <<'SH'
#!/usr/bin/env bash
# Runs the CUDA tests and kernel benchmarks from this bundle; writes gpu-results.txt next to it.
cd "$(dirname "$0")" && exec ./build.sh gpu-check "$@"
SH
  chmod +x "$stage/gpu-check" "$stage/build.sh"
  (cd "$ROOT/build/bundle" && tar -cJf "$ROOT/dist/nativepeft-gpu-linux-x64.tar.xz" nativepeft-gpu)
  local size; size=$(stat -c %s "$ROOT/dist/nativepeft-gpu-linux-x64.tar.xz")
  log "bundle: dist/nativepeft-gpu-linux-x64.tar.xz ($((size / 1024 / 1024)) MiB; unpacked $(du -sm "$stage" | cut -f1) MiB)"
  [ "$size" -le $((60 * 1024 * 1024)) ] || die "bundle is larger than 60 MiB"
}

# Inside an unpacked bundle: no SDK, no network. Runs everything that needs a GPU, and the benchmarks.
cmd_gpu_check() {
  [ -x ./NativePeft.Tests ] || die "gpu-check runs inside an unpacked bundle (./build.sh gpu-bundle makes one)"
  local out="${1:-gpu-results.txt}" status="$PWD/build/gpu-check-status"
  mkdir -p build
  {
    echo "# NativePeft gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
    echo "## nvidia-smi"; (nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi not available")
    echo "## nativepeft info"; ./NativePeft.Cli info 2>&1
    echo "## tests"
    if run_tests ./NativePeft.Tests; then echo 0 > "$status"; else echo 1 > "$status"; fi
    echo "## kernel benchmarks"
    # gpu-check is for GPU machines: no CUDA device (or a failing benchmark) fails it, even if the tests passed.
    timeout 300 ./NativePeft.Cli bench --device cuda 2>&1 || { echo "bench failed: no CUDA device or a kernel error"; echo 1 > "$status"; }
    echo "## training step of a random Llama (full, LoRA, QLoRA) on CUDA: bf16 mixed precision, then fp32"
    timeout 200 ./NativePeft.Cli bench --model small --device cuda --precision bf16 --profile 2>&1 || { echo "model bench (bf16) failed"; echo 1 > "$status"; }
    timeout 200 ./NativePeft.Cli bench --model small --device cuda --precision fp32 2>&1 || { echo "model bench (fp32) failed"; echo 1 > "$status"; }
    echo "## compare on CUDA (the main job: full, LoRA, QLoRA on the built-in model; bf16 mixed precision; the memory pool)"
    rm -rf build/compare-cuda
    timeout 600 ./NativePeft.Cli compare --device cuda --out build/compare-cuda 2>&1 || { echo "compare on CUDA failed"; echo 1 > "$status"; }
    echo "## generate on CUDA with the LoRA adapter compare trained (KV cache), and without it"
    for adapter in build/compare-cuda/lora/adapter ""; do
      timeout 60 ./NativePeft.Cli generate --device cuda ${adapter:+--adapter "$adapter"} --prompt $'upper: ajjgi\n' --max-tokens 12 2>&1 \
        || { echo "generate failed"; echo 1 > "$status"; }
    done
    echo "## bitsandbytes cross-check (same bytes both ways)"
    if python3 -c "import torch, safetensors, bitsandbytes" 2>/dev/null; then
      timeout 300 python3 ./bnb_crosscheck.py "$PWD/NativePeft.Cli" "$PWD/build/bnb-crosscheck" 2>&1 || echo 1 > "$status"
    else
      echo "skipped: python3 with torch, safetensors and bitsandbytes not found"
    fi
    echo "## transformers + PEFT cross-check (our adapters, merges and forward there; PEFT's adapters here)"
    if python3 -c "import torch, transformers, peft, safetensors" 2>/dev/null; then
      rm -rf build/peft-crosscheck
      timeout 600 python3 ./peft_crosscheck.py "$PWD/NativePeft.Cli" "$PWD/builtin-model" "$PWD/build/peft-crosscheck" cuda 2>&1 || echo 1 > "$status"
    else
      echo "skipped: python3 with torch, transformers, peft and safetensors not found"
    fi
  } 2>&1 | tee "$out"
  echo "results written to $PWD/$out"
  [ "$(cat "$status" 2>/dev/null)" = 0 ]
}

case "${1:-}" in
  run) shift; cmd_run "$@" ;;
  test) shift; cmd_test "$@" ;;
  build) shift; build_all ;;
  gpu-bundle) shift; cmd_gpu_bundle ;;
  gpu-check) shift; ROOT="$PWD"; cmd_gpu_check "$@" ;;
  *) echo "usage: ./build.sh run | test | build | gpu-bundle | gpu-check" >&2; exit 2 ;;
esac
