namespace NativePeft.Runtime;

/// <summary>A device address: a CUdeviceptr on CUDA, a host address on the emulator.</summary>
public readonly record struct DevicePtr(ulong Address)
{
    public static readonly DevicePtr Null = new(0);
    public bool IsNull => Address == 0;
    public DevicePtr Offset(long bytes) => new(checked((ulong)((long)Address + bytes)));
    public override string ToString() => $"0x{Address:x}";
}

/// <summary>Launch dimensions, as CUDA's dim3.</summary>
public readonly record struct Dim3(uint X, uint Y = 1, uint Z = 1)
{
    public static implicit operator Dim3(int x) => new(checked((uint)x));
    public static implicit operator Dim3(uint x) => new(x);
    public ulong Count => (ulong)X * Y * Z;
}

/// <summary>
/// One kernel argument of at most 8 bytes (a pointer, an int, a float, a long), kept by value
/// so a launch can build the void** array cuLaunchKernel and emu_launch both take.
/// </summary>
public readonly struct KernelArg
{
    public readonly ulong Bits;
    public readonly int Size;

    private KernelArg(ulong bits, int size) { Bits = bits; Size = size; }

    public static implicit operator KernelArg(DevicePtr p) => new(p.Address, 8);
    public static implicit operator KernelArg(int v) => new(unchecked((uint)v), 4);
    public static implicit operator KernelArg(uint v) => new(v, 4);
    public static implicit operator KernelArg(long v) => new(unchecked((ulong)v), 8);
    public static implicit operator KernelArg(ulong v) => new(v, 8);
    public static implicit operator KernelArg(float v) => new(BitConverter.SingleToUInt32Bits(v), 4);
}

public enum GpuKind { Cuda, Emulated }

/// <summary>Static facts about a device.</summary>
public sealed record GpuProperties(
    string Name,
    GpuKind Kind,
    long TotalMemoryBytes,
    int MultiprocessorCount,
    int ComputeCapabilityMajor,
    int ComputeCapabilityMinor,
    bool ConcurrentManagedAccess,
    int DriverVersion);

/// <summary>
/// The accelerator the ops run on. Two implementations: <c>CudaGpu</c> (the real device through our
/// binding of the CUDA driver API and cuBLAS) and <c>EmulatedGpu</c> (host memory plus the same
/// kernels compiled for the CPU into libnativepeft_emu). Kernels are launched by name.
/// All calls are on one logical stream; Synchronize waits for it.
/// </summary>
public interface IGpu : IDisposable
{
    GpuProperties Properties { get; }

    DevicePtr Alloc(long bytes);
    /// <summary>Managed (unified) memory, as used by the paged optimizers.</summary>
    DevicePtr AllocManaged(long bytes);
    void Free(DevicePtr ptr);

    void CopyToDevice<T>(ReadOnlySpan<T> source, DevicePtr destination) where T : unmanaged;
    void CopyToHost<T>(DevicePtr source, Span<T> destination) where T : unmanaged;
    void CopyDeviceToDevice(DevicePtr source, DevicePtr destination, long bytes);
    void Memset(DevicePtr ptr, byte value, long bytes);
    /// <summary>Hint that managed memory will be used on the device (no-op where not supported).</summary>
    void Prefetch(DevicePtr ptr, long bytes, bool toDevice);

    /// <summary>
    /// Row-major, contiguous C[m, n] = alpha · op(A) · op(B) + beta · C with fp32 accumulation: A ([m, k], or [k, m]
    /// when transA) and B ([k, n], or [n, k] when transB) both F32 or both BF16; C F32, or BF16 with BF16 inputs
    /// (rounded once to nearest even). cuBLAS on CUDA (CUBLAS_COMPUTE_32F), the host BLAS on the emulator (bf16 inputs
    /// widened exactly to fp32). On the device's stream.
    /// </summary>
    void Gemm(bool transA, bool transB, int m, int n, int k, float alpha, DevicePtr a, DevicePtr b, float beta, DevicePtr c,
        Numerics.DType inputs, Numerics.DType output);

    /// <summary>Launch a kernel by its extern "C" name; args are the kernel's parameters in order.</summary>
    void Launch(string kernel, Dim3 grid, Dim3 block, int sharedBytes, params ReadOnlySpan<KernelArg> args);

    /// <summary>True when the loaded kernel image defines this entry point.</summary>
    bool HasKernel(string kernel);

    void Synchronize();

    /// <summary>Free and total device memory in bytes.</summary>
    (long Free, long Total) MemoryInfo();
}
