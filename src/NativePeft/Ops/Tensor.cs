using NativePeft.Numerics;
using NativePeft.Runtime;

namespace NativePeft.Ops;

/// <summary>
/// A row-major tensor: a dtype, a shape and an address on the device its <see cref="IOps"/> runs on (a host
/// address for <see cref="CpuOps"/>, a device address for <see cref="GpuOps"/>). A tensor does not own memory: the
/// allocator it came from does (whole tensors), or it is a view into another tensor's bytes. The ops never allocate
/// the tensors they are given; what an op needs besides its inputs and outputs is passed in as workspace.
/// </summary>
public sealed class Tensor
{
    public DevicePtr Data { get; }
    public DType DType { get; }
    public IReadOnlyList<int> Shape => _shape;
    public long Count { get; }
    public long Bytes => Count * DType.ElementSize();
    public int Rank => _shape.Length;

    private readonly int[] _shape;

    public Tensor(DevicePtr data, DType dtype, params int[] shape)
    {
        ArgumentNullException.ThrowIfNull(shape);
        long count = 1;
        foreach (var d in shape)
        {
            if (d < 0) throw new ArgumentException($"negative dimension in shape [{string.Join(", ", shape)}]", nameof(shape));
            count = checked(count * d);
        }
        Data = data;
        DType = dtype;
        _shape = (int[])shape.Clone();
        Count = count;
    }

    public int this[int dim] => _shape[dim < 0 ? _shape.Length + dim : dim];

    /// <summary>Rows of the tensor seen as a matrix [Count / last dim, last dim].</summary>
    public int Rows => Rank == 0 ? 1 : checked((int)(Count / Math.Max(1, _shape[^1])));

    /// <summary>The last dimension (1 for a scalar).</summary>
    public int Columns => Rank == 0 ? 1 : _shape[^1];

    /// <summary>The same bytes with another shape of the same element count.</summary>
    public Tensor Reshape(params int[] shape)
    {
        var t = new Tensor(Data, DType, shape);
        if (t.Count != Count)
            throw new ArgumentException($"cannot reshape [{ShapeText}] ({Count} elements) to [{string.Join(", ", shape)}]", nameof(shape));
        return t;
    }

    /// <summary>A contiguous slice starting <paramref name="elementOffset"/> elements in, with the given shape.</summary>
    public Tensor Slice(long elementOffset, params int[] shape)
    {
        var t = new Tensor(Data.Offset(elementOffset * DType.ElementSize()), DType, shape);
        if (elementOffset < 0 || elementOffset + t.Count > Count)
            throw new ArgumentOutOfRangeException(nameof(elementOffset),
                $"slice [{elementOffset}, {elementOffset + t.Count}) is outside the {Count} elements of [{ShapeText}]");
        return t;
    }

    /// <summary>Rows [first, first + count) of the tensor seen as a matrix.</summary>
    public Tensor RowSlice(int first, int count) => Slice((long)first * Columns, count, Columns);

    public string ShapeText => string.Join(", ", _shape);

    public override string ToString() => $"{DType}[{ShapeText}] at {Data}";

    /// <summary>Throws unless the tensor has exactly this shape (names the tensor in the message).</summary>
    public Tensor Expect(string name, params int[] shape)
    {
        if (!_shape.AsSpan().SequenceEqual(shape))
            throw new ArgumentException($"{name}: expected shape [{string.Join(", ", shape)}], got [{ShapeText}]", name);
        return this;
    }

    /// <summary>Throws unless the tensor has this many elements.</summary>
    public Tensor ExpectCount(string name, long count)
    {
        if (Count != count)
            throw new ArgumentException($"{name}: expected {count} elements, got [{ShapeText}] = {Count}", name);
        return this;
    }
}
