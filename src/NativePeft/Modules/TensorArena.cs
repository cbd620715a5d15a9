using NativePeft.Numerics;
using NativePeft.Ops;

namespace NativePeft.Modules;

/// <summary>
/// The tensors one owner allocated from a <see cref="TensorMemory"/>, freed together (in reverse order) on
/// <see cref="Dispose"/>. The model keeps its parameters in one arena and its activations in another, so a failed
/// load or a change of batch shape frees exactly what it allocated.
/// </summary>
internal sealed class TensorArena(TensorMemory memory, MemoryRegion region = MemoryRegion.Transient) : IDisposable
{
    private readonly List<Tensor> _tensors = [];

    public TensorMemory Memory => memory;

    /// <summary>Bytes held by this arena.</summary>
    public long Bytes => _tensors.Sum(t => Math.Max(1, t.Bytes));

    public Tensor Allocate(DType dtype, params int[] shape)
    {
        var t = memory.Allocate(region, dtype, shape);
        _tensors.Add(t);
        return t;
    }

    /// <summary>Frees one tensor of this arena now (a temporary during loading).</summary>
    public void Free(Tensor tensor)
    {
        if (!_tensors.Remove(tensor)) throw new InvalidOperationException($"{tensor} is not in this arena");
        memory.Free(tensor);
    }

    public void Dispose()
    {
        for (int i = _tensors.Count - 1; i >= 0; i--) memory.Free(_tensors[i]);
        _tensors.Clear();
    }
}
