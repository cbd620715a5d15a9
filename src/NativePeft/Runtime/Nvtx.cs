using System.Collections.Concurrent;
using System.Runtime.InteropServices;
using System.Text;

namespace NativePeft.Runtime;

/// <summary>
/// NVTX ranges around the training step (by layer and op), so that Nsight Systems' timeline and Nsight Compute's
/// <c>--nvtx-include</c> filters see the step as the model runs it (docs/profiling.md). Ranges go through
/// libnativepeft_nvtx (kernels/nvtx, next to the kernels), a C ABI over the header-only NVTX v3, which hands them to the
/// profiling tool NVTX finds through <c>NVTX_INJECTION64_PATH</c> (Nsight sets it in the processes it profiles).
/// <para>
/// Ranges are emitted only when that variable is set (or <c>NATIVEPEFT_NVTX=1</c>) and the library loads;
/// <c>NATIVEPEFT_NVTX=0</c> turns them off. Otherwise <see cref="Range"/> returns an empty scope: no native call, no
/// allocation. A missing library is never an error.
/// </para>
/// </summary>
public static unsafe class Nvtx
{
    /// <summary>"1" emits ranges even without a tool variable (a tool attached another way), "0" never.</summary>
    public const string EnableVariable = "NATIVEPEFT_NVTX";
    /// <summary>The variable NVTX reads to find the profiling tool.</summary>
    public const string InjectionVariable = "NVTX_INJECTION64_PATH";

    private static readonly delegate* unmanaged<byte*, int> PushRange;
    private static readonly delegate* unmanaged<int> PopRange;
    private static readonly ConcurrentDictionary<string, byte[]> EncodedNames = new(StringComparer.Ordinal);

    /// <summary>Whether ranges are emitted in this process (decided once, at first use).</summary>
    public static bool Enabled { get; }

    /// <summary>Why ranges are or are not emitted (for `nativepeft info`).</summary>
    public static string Status { get; }

    public static string LibraryPath => Path.Combine(KernelLocator.Directory,
        OperatingSystem.IsWindows() ? "nativepeft_nvtx.dll" : OperatingSystem.IsMacOS() ? "libnativepeft_nvtx.dylib" : "libnativepeft_nvtx.so");

    static Nvtx()
    {
        string? setting = Environment.GetEnvironmentVariable(EnableVariable);
        bool tool = !string.IsNullOrEmpty(Environment.GetEnvironmentVariable(InjectionVariable));
        if (setting == "0") { Status = $"off ({EnableVariable}=0)"; return; }
        if (!tool && setting != "1") { Status = $"off (no profiling tool: {InjectionVariable} is not set)"; return; }
        if (!NativeLibrary.TryLoad(LibraryPath, out var handle)) { Status = $"off ({LibraryPath} not found or not loadable)"; return; }
        if (!NativeLibrary.TryGetExport(handle, "nativepeft_nvtx_push", out var push) ||
            !NativeLibrary.TryGetExport(handle, "nativepeft_nvtx_pop", out var pop))
        {
            Status = $"off ({LibraryPath} lacks nativepeft_nvtx_push/pop)";
            return;
        }
        PushRange = (delegate* unmanaged<byte*, int>)push;
        PopRange = (delegate* unmanaged<int>)pop;
        Enabled = true;
        Status = tool ? $"on (tool: {Environment.GetEnvironmentVariable(InjectionVariable)})" : $"on ({EnableVariable}=1)";
    }

    /// <summary>
    /// Opens a range on this thread, closed when the returned scope is disposed (<c>using var _ = Nvtx.Range("…")</c>).
    /// Pass names that repeat (constants, or strings the caller keeps): each distinct name is encoded once.
    /// </summary>
    public static Scope Range(string name)
    {
        if (!Enabled) return default;
        var bytes = EncodedNames.GetOrAdd(name, static n => Encoding.UTF8.GetBytes(n + "\0"));
        fixed (byte* p = bytes) PushRange(p);
        return new Scope(true);
    }

    /// <summary>An open range (or nothing, when ranges are off).</summary>
    public readonly struct Scope : IDisposable
    {
        private readonly bool _open;
        internal Scope(bool open) => _open = open;
        public void Dispose()
        {
            if (_open) PopRange();
        }
    }
}
