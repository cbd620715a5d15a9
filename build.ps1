# NativePeft build script (Windows, and PowerShell 7 anywhere). The same commands as build.sh:
#   .\build.ps1 run | test | build | pack | gpu-bundle
# Needs the .NET 10 SDK, CMake with a C++ compiler (Visual Studio Build Tools), and for the PTX the CUDA
# toolkit (nvcc on PATH or CUDA_PATH set; the driver's nvcuda.dll is used at run time). Without nvcc the
# CPU and emulator paths still build, and one line says what was skipped.
param([Parameter(Position = 0)][string]$Command = "")
$ErrorActionPreference = "Stop"
$Root = $PSScriptRoot
$Config = if ($env:NATIVEPEFT_CONFIG) { $env:NATIVEPEFT_CONFIG } else { "Release" }
$KernelOut = Join-Path $Root "build/kernels"
$Tfm = "net10.0"

function Log($m) { Write-Host "[build.ps1] $m" }
function Die($m) { Write-Error "[build.ps1] error: $m"; exit 1 }

function Find-Nvcc {
  if ($env:NATIVEPEFT_NVCC) { return $env:NATIVEPEFT_NVCC }
  $c = Get-Command nvcc -ErrorAction SilentlyContinue
  if ($c) { return $c.Source }
  if ($env:CUDA_PATH -and (Test-Path (Join-Path $env:CUDA_PATH "bin/nvcc.exe"))) { return (Join-Path $env:CUDA_PATH "bin/nvcc.exe") }
  return $null
}

function Build-All {
  if (-not (Get-Command dotnet -ErrorAction SilentlyContinue)) { Die "the .NET 10 SDK (dotnet) is required" }
  if (-not (Get-Command cmake -ErrorAction SilentlyContinue)) {
    if (Get-Command winget -ErrorAction SilentlyContinue) { winget install --silent Kitware.CMake } else { Die "cmake is required" }
  }
  $script:Nvcc = Find-Nvcc
  $cmakeArgs = @("-S", $Root, "-B", (Join-Path $Root "build/cmake"), "-DCMAKE_BUILD_TYPE=Release")
  if ($script:Nvcc) { $cmakeArgs += @("-DNATIVEPEFT_BUILD_PTX=ON", "-DNATIVEPEFT_NVCC=$($script:Nvcc)") }
  else { $cmakeArgs += "-DNATIVEPEFT_BUILD_PTX=OFF"; Log "skipped PTX/fatbin: nvcc not found (install the CUDA toolkit); CPU and emulator paths are built" }
  cmake @cmakeArgs | Out-Null; if ($LASTEXITCODE) { Die "cmake configure failed" }
  cmake --build (Join-Path $Root "build/cmake") --config Release; if ($LASTEXITCODE) { Die "kernel build failed" }
  # Multi-config generators put the DLL under Release/: copy it where the .NET build looks.
  Get-ChildItem -Recurse (Join-Path $Root "build/cmake") -Filter nativepeft_emu.dll | Copy-Item -Destination $KernelOut -Force
  dotnet build (Join-Path $Root "NativePeft.sln") -c $Config -nologo -v quiet; if ($LASTEXITCODE) { Die "dotnet build failed" }
}

# The test runner (an executable through Microsoft.Testing.Platform): NativePeft.Tests.exe on Windows, NativePeft.Tests
# elsewhere. As build.sh, the whole suite runs under the emulator's race checks. NATIVEPEFT_TEST_FILTER (a --filter
# expression) and NATIVEPEFT_TEST_RESULTS (the results folder) are for the suite's own test of this script.
function Run-Tests {
  $results = if ($env:NATIVEPEFT_TEST_RESULTS) { $env:NATIVEPEFT_TEST_RESULTS } else { Join-Path $Root "build/test-results" }
  Remove-Item -Recurse -Force $results -ErrorAction SilentlyContinue
  $exe = if ($IsWindows -or $env:OS -eq "Windows_NT") { "NativePeft.Tests.exe" } else { "NativePeft.Tests" }
  $runner = Join-Path $Root "tests/NativePeft.Tests/bin/$Config/$Tfm/$exe"
  if (-not (Test-Path $runner)) { Die "the test runner $runner is missing (build first)" }
  if (-not $env:NATIVEPEFT_EMU_CHECKS) { $env:NATIVEPEFT_EMU_CHECKS = "all" }
  $filter = if ($env:NATIVEPEFT_TEST_FILTER) { @("--filter", $env:NATIVEPEFT_TEST_FILTER) } else { @() }
  & $runner --results-directory $results --report-trx --report-trx-filename tests.trx @filter
  $rc = $LASTEXITCODE
  [xml]$trx = Get-Content (Join-Path $results "tests.trx")
  $c = $trx.TestRun.ResultSummary.Counters
  $failed = [int]$c.failed + [int]$c.error + [int]$c.timeout + [int]$c.aborted
  if ($rc -ne 0 -and $failed -eq 0) { $failed = 1 }
  foreach ($r in $trx.TestRun.Results.UnitTestResult) {
    if ($r.outcome -eq "NotExecuted") { Write-Host "  skipped: $($r.testName): $($r.Output.ErrorInfo.Message)" }
  }
  Write-Host "$($c.passed) passed, $failed failed, $($c.notExecuted) skipped"
  if ($failed -ne 0) { exit 1 }
}

function Cli { dotnet (Join-Path $Root "src/NativePeft.Cli/bin/$Config/$Tfm/NativePeft.Cli.dll") @args; if ($LASTEXITCODE) { exit $LASTEXITCODE } }

switch ($Command) {
  "build" { Build-All }
  "test" { if (-not $env:NATIVEPEFT_SKIP_BUILD) { Build-All }; Run-Tests }
  "run" {
    Build-All
    $out = Join-Path $Root "out/run"
    Cli info
    Cli demo-checkpoint --out (Join-Path $out "demo-model.safetensors")
    Cli quantize --in (Join-Path $out "demo-model.safetensors") --out (Join-Path $out "demo-model-nf4.safetensors") --quant-type nf4 --blocksize 64 --double-quant
  }
  "pack" {
    Build-All
    $dist = Join-Path $Root "dist"
    New-Item -ItemType Directory -Force $dist | Out-Null
    Remove-Item -Force (Join-Path $dist "NativePeft.*.nupkg") -ErrorAction SilentlyContinue
    foreach ($proj in @("src/NativePeft/NativePeft.csproj", "src/NativePeft.Cli/NativePeft.Cli.csproj")) {
      dotnet pack (Join-Path $Root $proj) -c $Config --no-build -o $dist -nologo -v quiet; if ($LASTEXITCODE) { Die "dotnet pack of $proj failed" }
    }
    Get-ChildItem $dist -Filter "NativePeft.*.nupkg" | ForEach-Object { Log "package: dist/$($_.Name)" }
  }
  "gpu-bundle" {
    Build-All
    $stage = Join-Path $Root "build/bundle/nativepeft-gpu"
    Remove-Item -Recurse -Force (Join-Path $Root "build/bundle") -ErrorAction SilentlyContinue
    dotnet publish (Join-Path $Root "tests/NativePeft.Tests/NativePeft.Tests.csproj") -c $Config -r win-x64 --self-contained -o $stage
    dotnet publish (Join-Path $Root "src/NativePeft.Cli/NativePeft.Cli.csproj") -c $Config -r win-x64 --self-contained -o $stage
    New-Item -ItemType Directory -Force (Join-Path $Root "dist") | Out-Null
    Compress-Archive -Force -Path $stage -DestinationPath (Join-Path $Root "dist/nativepeft-gpu-win-x64.zip")
  }
  default { Write-Host "usage: .\build.ps1 run | test | build | pack | gpu-bundle"; exit 2 }
}
