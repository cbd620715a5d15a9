using NativePeft.Ops;

namespace NativePeft.Modules;

/// <summary>
/// The tensors one owner allocated from a <see cref="TensorMemory"/>, freed together (in reverse order) on
/// <see cref="Dispose"/>. The model keeps its parameters in one arena and its activations in another, so a failed
/// load or a change of batch shape frees exactly what it allocated. Every tensor is allocated from a
/// <see cref="TensorSpec"/> of the <see cref="ModelLayout"/> (its dtype, shape and pool arena), and the arena keeps the
/// specs it allocated (<see cref="Allocated"/>), which the tests compare with the layout.
/// </summary>
internal sealed class TensorArena(TensorMemory memory) : IDisposable
{
    private readonly List<Tensor> _tensors = [];
    private readonly List<TensorSpec> _specs = [];

    public TensorMemory Memory => memory;

    /// <summary>Bytes held by this arena.</summary>
    public long Bytes => _tensors.Sum(t => Math.Max(1, t.Bytes));

    /// <summary>The specs of the tensors held now, in allocation order.</summary>
    public IReadOnlyList<TensorSpec> Allocated => _specs;

    /// <summary>A zero-filled tensor of <paramref name="spec"/>'s dtype and shape from its region.</summary>
    public Tensor Allocate(TensorSpec spec)
    {
        ArgumentNullException.ThrowIfNull(spec);
        var t = memory.Allocate(spec.Region, spec.DType, spec.IntShape());
        _tensors.Add(t);
        _specs.Add(spec);
        return t;
    }

    public void Dispose()
    {
        for (int i = _tensors.Count - 1; i >= 0; i--) memory.Free(_tensors[i]);
        _tensors.Clear();
        _specs.Clear();
    }
}
