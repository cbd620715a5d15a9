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
/// One kernel argument: a value of at most 8 bytes (a pointer, an int, a float, a long), kept by value, or a parameter
/// struct passed by address (<see cref="Struct{T}"/>), so a launch can build the void** array cuLaunchKernel and
/// emu_launch both take (each entry points at one parameter's bytes; the callee copies them during the call).
/// </summary>
public readonly struct KernelArg
{
    /// <summary>The value (a 4-byte value in the low bytes), or for a struct argument the address of its bytes.</summary>
    public readonly ulong Bits;
    /// <summary>The parameter's size in bytes.</summary>
    public readonly int Size;
    /// <summary>True for a struct argument: <see cref="Bits"/> is the address of <see cref="Size"/> bytes.</summary>
    public readonly bool ByAddress;

    private KernelArg(ulong bits, int size, bool byAddress = false) { Bits = bits; Size = size; ByAddress = byAddress; }

    public static implicit operator KernelArg(DevicePtr p) => new(p.Address, 8);
    public static implicit operator KernelArg(int v) => new(unchecked((uint)v), 4);
    public static implicit operator KernelArg(uint v) => new(v, 4);
    public static implicit operator KernelArg(long v) => new(unchecked((ulong)v), 8);
    public static implicit operator KernelArg(ulong v) => new(v, 8);
    public static implicit operator KernelArg(float v) => new(BitConverter.SingleToUInt32Bits(v), 4);

    /// <summary>
    /// A parameter struct passed by value to the kernel (a C struct mirrored by a <c>[StructLayout(Sequential)]</c>
    /// unmanaged struct, e.g. <c>NativePeft.Ops.AttnTcParams</c>): the argument holds <paramref name="value"/>'s address,
    /// which must stay valid (a local, or pinned) until the launch call returns. Prefer
    /// <see cref="GpuLaunch.LaunchWithParams{T}"/>, which pins it.
    /// </summary>
    public static unsafe KernelArg Struct<T>(T* value) where T : unmanaged
    {
        if (value == null)
            throw new ArgumentNullException(nameof(value), "a struct kernel argument needs the struct's address");
        return new((ulong)value, sizeof(T), byAddress: true);
    }

    /// <summary>The address cuLaunchKernel / emu_launch read this parameter from: the struct's, or <paramref name="slot"/> after storing the value there.</summary>
    internal unsafe void* Place(ulong* slot)
    {
        if (ByAddress)
            return (void*)Bits;
        *slot = Bits;
        return slot;
    }
}

/// <summary>Launches of kernels that take one parameter struct (see <see cref="KernelArg.Struct{T}"/>).</summary>
public static class GpuLaunch
{
    /// <summary>
    /// Launches <paramref name="kernel"/> with <paramref name="parameters"/> as its one parameter, passed by value
    /// (pinned for the duration of the call; both devices copy it before the launch returns).
    /// </summary>
    public static unsafe void LaunchWithParams<T>(this IGpu gpu, string kernel, Dim3 grid, Dim3 block, int sharedBytes, in T parameters)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(gpu);
        fixed (T* p = &parameters)
            gpu.Launch(kernel, grid, block, sharedBytes, KernelArg.Struct(p));
    }
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
