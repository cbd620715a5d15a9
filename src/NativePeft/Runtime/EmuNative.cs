using System.Runtime.InteropServices;
using System.Text;

namespace NativePeft.Runtime;

/// <summary>
/// Binding of libnativepeft_emu's C ABI (kernels/emu/emu_runtime.cpp). The library is loaded once per
/// process from <c>$NATIVEPEFT_KERNELS</c> or <c>&lt;AppContext.BaseDirectory&gt;/kernels</c> and never
/// unloaded (its worker threads live as long as the process).
/// </summary>
internal sealed unsafe class EmuNative
{
    public const string KernelsDirVariable = KernelLocator.EnvironmentVariable;

    private static readonly object LoadLock = new();
    private static EmuNative? s_loaded;
    private static string? s_loadError;

    private readonly delegate* unmanaged<byte*, uint, uint, uint, uint, uint, uint, uint, void**, int> _launch;
    private readonly delegate* unmanaged<byte*> _lastError;
    private readonly delegate* unmanaged<int> _kernelCount;
    private readonly delegate* unmanaged<int, byte*> _kernelName;
    private readonly delegate* unmanaged<byte*, int*, int, int> _kernelParams;
    private readonly delegate* unmanaged<int, void> _setWorkerThreads;
    private readonly delegate* unmanaged<int> _workerThreads;
    private readonly delegate* unmanaged<int, ulong, void> _setChecks;
    private readonly delegate* unmanaged<int> _checks;
    private readonly delegate* unmanaged<int> _defaultChecks;

    public string LibraryPath { get; }

    private EmuNative(string path, IntPtr handle)
    {
        LibraryPath = path;
        _launch = (delegate* unmanaged<byte*, uint, uint, uint, uint, uint, uint, uint, void**, int>)
            NativeLibrary.GetExport(handle, "emu_launch");
        _lastError = (delegate* unmanaged<byte*>)NativeLibrary.GetExport(handle, "emu_last_error");
        _kernelCount = (delegate* unmanaged<int>)NativeLibrary.GetExport(handle, "emu_kernel_count");
        _kernelName = (delegate* unmanaged<int, byte*>)NativeLibrary.GetExport(handle, "emu_kernel_name");
        _kernelParams = (delegate* unmanaged<byte*, int*, int, int>)NativeLibrary.GetExport(handle, "emu_kernel_params");
        _setWorkerThreads = (delegate* unmanaged<int, void>)NativeLibrary.GetExport(handle, "emu_set_worker_threads");
        _workerThreads = (delegate* unmanaged<int>)NativeLibrary.GetExport(handle, "emu_worker_threads");
        _setChecks = (delegate* unmanaged<int, ulong, void>)NativeLibrary.GetExport(handle, "emu_set_checks");
        _checks = (delegate* unmanaged<int>)NativeLibrary.GetExport(handle, "emu_checks");
        _defaultChecks = (delegate* unmanaged<int>)NativeLibrary.GetExport(handle, "emu_default_checks");
    }

    public static string LibraryFileName => Path.GetFileName(KernelLocator.EmulatorLibraryPath);

    /// <summary>The directory searched for the emulator library.</summary>
    public static string KernelsDirectory => KernelLocator.Directory;

    public static bool TryLoad(out EmuNative? native, out string reason)
    {
        lock (LoadLock)
        {
            if (s_loaded is null && s_loadError is null)
            {
                string dir = KernelsDirectory;
                string path = Path.Combine(dir, LibraryFileName);
                if (!File.Exists(path))
                {
                    s_loadError = $"{LibraryFileName} not found in {dir}: run ./build.sh (or set {KernelsDirVariable})";
                }
                else
                {
                    try
                    {
                        IntPtr handle = NativeLibrary.Load(path);
                        s_loaded = new EmuNative(path, handle);
                    }
                    catch (Exception e) when (e is DllNotFoundException or BadImageFormatException or EntryPointNotFoundException)
                    {
                        s_loadError = $"cannot load {path}: {e.Message}";
                    }
                }
            }
            native = s_loaded;
            reason = s_loadError ?? "";
            return native is not null;
        }
    }

    public int Launch(string kernel, Dim3 grid, Dim3 block, uint sharedBytes, void** args)
    {
        byte* name = stackalloc byte[Encoding.UTF8.GetMaxByteCount(kernel.Length) + 1];
        int n = Encoding.UTF8.GetBytes(kernel, new Span<byte>(name, Encoding.UTF8.GetMaxByteCount(kernel.Length)));
        name[n] = 0;
        return _launch(name, grid.X, grid.Y, grid.Z, block.X, block.Y, block.Z, sharedBytes, args);
    }

    public string LastError() => Marshal.PtrToStringUTF8((IntPtr)_lastError()) ?? "";

    public IReadOnlyList<string> KernelNames()
    {
        int count = _kernelCount();
        var names = new List<string>(count);
        for (int i = 0; i < count; i++)
        {
            string? s = Marshal.PtrToStringUTF8((IntPtr)_kernelName(i));
            if (s is not null) names.Add(s);
        }
        return names;
    }

    /// <summary>The byte size of each parameter of a registered kernel, or null when it is unknown.</summary>
    public int[]? KernelParameterSizes(string kernel)
    {
        byte[] name = Encoding.UTF8.GetBytes(kernel + "\0");
        fixed (byte* p = name)
        {
            int count = _kernelParams(p, null, 0);
            if (count < 0) return null;
            var sizes = new int[count];
            fixed (int* s = sizes) _kernelParams(p, s, count);
            return sizes;
        }
    }

    public void SetWorkerThreads(int n) => _setWorkerThreads(n);

    public int WorkerThreads() => _workerThreads();

    public void SetChecks(int flags, ulong seed) => _setChecks(flags, seed);

    public int Checks() => _checks();

    public int DefaultChecks() => _defaultChecks();
}
