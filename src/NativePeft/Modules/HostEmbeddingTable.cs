using NativePeft.Numerics;
using NativePeft.Ops;

namespace NativePeft.Modules;

/// <summary>
/// A frozen embedding table [V, C] kept in host memory (<see cref="LlamaModelOptions.EmbeddingOnHost"/>), in the compute
/// dtype the device table would have had (the same rounded values). A forward gathers the batch's rows on the host into
/// a staging array and uploads them as [N, C] — the device never holds the table (Llama-3-8B: 128256 × 4096 bf16 =
/// 1 GiB). The staging array is kept between calls (N · C elements of the largest batch seen).
/// </summary>
public sealed class HostEmbeddingTable
{
    private readonly BFloat16[]? _bf16;
    private readonly float[]? _f32;
    private readonly double[]? _f64;
    private Array? _staging;

    public int Rows { get; }
    public int Columns { get; }
    public DType DType { get; }
    /// <summary>Host bytes of the table.</summary>
    public long Bytes => (long)Rows * Columns * DType.ElementSize();

    internal HostEmbeddingTable(float[] values, int rows, int columns, DType dtype)
    {
        if (values.LongLength != (long)rows * columns)
            throw new ArgumentException($"{values.LongLength} values for a [{rows}, {columns}] embedding table", nameof(values));
        Rows = rows;
        Columns = columns;
        DType = dtype;
        switch (dtype)
        {
            case DType.BF16: _bf16 = new BFloat16[values.Length]; BFloat16.FromSingle(values, _bf16); break;
            case DType.F32: _f32 = values; break;
            case DType.F64: _f64 = Array.ConvertAll(values, v => (double)v); break;
            default: throw new ArgumentException($"EmbeddingOnHost: compute dtype {dtype} is not supported (BF16, F32, F64)", nameof(dtype));
        }
    }

    /// <summary>output [ids.Length, C] (on the device) = the table's rows ids[n]; an id outside [0, V) throws, naming it.</summary>
    public void Gather(IOps ops, ReadOnlySpan<int> ids, Tensor output)
    {
        ArgumentNullException.ThrowIfNull(ops);
        output.Expect(nameof(output), ids.Length, Columns);
        if (output.DType != DType) throw new ArgumentException($"output: {output.DType}, the table is {DType}", nameof(output));
        switch (DType)
        {
            case DType.BF16: ops.Upload<BFloat16>(GatherRows(_bf16!, ids), output); break;
            case DType.F32: ops.Upload<float>(GatherRows(_f32!, ids), output); break;
            default: ops.Upload<double>(GatherRows(_f64!, ids), output); break;
        }
    }

    private ReadOnlySpan<T> GatherRows<T>(T[] table, ReadOnlySpan<int> ids)
    {
        long count = (long)ids.Length * Columns;
        if (_staging is not T[] staging || staging.LongLength < count) _staging = staging = new T[count];
        for (int n = 0; n < ids.Length; n++)
        {
            int id = ids[n];
            if ((uint)id >= (uint)Rows)
                throw new ArgumentOutOfRangeException(nameof(ids), id, $"token id {id} at position {n} is outside the vocabulary [0, {Rows})");
            table.AsSpan(id * Columns, Columns).CopyTo(staging.AsSpan(n * Columns, Columns));
        }
        return staging.AsSpan(0, (int)count);
    }
}
