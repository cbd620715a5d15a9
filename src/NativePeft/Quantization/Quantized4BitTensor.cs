using System.Runtime.InteropServices;
using NativePeft.Numerics;

namespace NativePeft.Quantization;

/// <summary>A 4-bit quantized tensor: the packed bytes ((n+1)/2, element 2j in the high nibble) and its state.</summary>
public sealed record Quantized4BitTensor
{
    public required byte[] Packed { get; init; }
    public required QuantState4Bit State { get; init; }

    public long ElementCount => State.ElementCount;

    /// <summary>
    /// Quantizes <paramref name="values"/> (float, BFloat16 or Half, row-major, product of <paramref name="shape"/>
    /// elements). <paramref name="originalDtype"/> is recorded as the dtype (bitsandbytes' QuantState.dtype); it must be
    /// F32, BF16 or F16.
    /// </summary>
    public static Quantized4BitTensor Quantize<T>(ReadOnlySpan<T> values, long[] shape, QuantType quantType, int blocksize,
        bool doubleQuant, DType originalDtype) where T : unmanaged =>
        Quantize(new ReadOnlyMemory<T>(values.ToArray()), shape, quantType, blocksize, doubleQuant, originalDtype); // Memory for the parallel path

    /// <summary>As the span overload, without copying the input (blocks are quantized in parallel).</summary>
    public static Quantized4BitTensor Quantize<T>(ReadOnlyMemory<T> values, long[] shape, QuantType quantType, int blocksize,
        bool doubleQuant, DType originalDtype) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(shape);
        Quant4Bit.ValidateBlocksize(blocksize);
        long n = DTypes.ElementCount(shape);
        if (n != values.Length)
            throw new ArgumentException($"shape [{string.Join(", ", shape)}] has {n} elements, values has {values.Length}", nameof(shape));
        if (originalDtype is not (DType.F32 or DType.BF16 or DType.F16))
            throw new ArgumentException($"original dtype must be F32, BF16 or F16, got {originalDtype}", nameof(originalDtype));
        var packed = new byte[Quant4Bit.PackedLength(n)];
        var absmax = new float[Quant4Bit.BlockCount(n, blocksize)];
        Quant4Bit.Quantize(values, packed, absmax, quantType, blocksize);
        return FromParts(packed, absmax, shape, quantType, blocksize, doubleQuant, originalDtype);
    }

    private static Quantized4BitTensor FromParts(byte[] packed, float[] absmax, long[] shape, QuantType quantType,
        int blocksize, bool doubleQuant, DType originalDtype) =>
        FromParts(packed, absmax, shape, quantType, blocksize, doubleQuant ? DoubleQuantState.Quantize(absmax) : null, originalDtype);

    /// <summary>
    /// Wraps packed bytes and absmax produced elsewhere (the GPU kernels) as a tensor; with <paramref name="nested"/>
    /// the absmax is stored double-quantized and <paramref name="absmax"/> is not kept.
    /// </summary>
    public static Quantized4BitTensor FromParts(byte[] packed, float[] absmax, long[] shape, QuantType quantType,
        int blocksize, DoubleQuantState? nested, DType originalDtype)
    {
        ArgumentNullException.ThrowIfNull(shape);
        Quant4Bit.ValidateBlocksize(blocksize);
        long n = DTypes.ElementCount(shape);
        if (packed.Length != Quant4Bit.PackedLength(n))
            throw new ArgumentException($"packed has {packed.Length} bytes, shape needs {Quant4Bit.PackedLength(n)}", nameof(packed));
        if (absmax.Length != Quant4Bit.BlockCount(n, blocksize))
            throw new ArgumentException($"absmax has {absmax.Length} values, shape needs {Quant4Bit.BlockCount(n, blocksize)}", nameof(absmax));
        var state = new QuantState4Bit
        {
            QuantType = quantType,
            Blocksize = blocksize,
            Dtype = originalDtype,
            Shape = (long[])shape.Clone(),
            Absmax = nested is null ? absmax : null,
            Nested = nested,
            QuantMap = FourBitCode.QuantMap(quantType),
        };
        return new Quantized4BitTensor { Packed = packed, State = state };
    }

    /// <summary>Dequantizes into <paramref name="output"/> (float, BFloat16 or Half; length = element count).</summary>
    public void Dequantize<T>(Memory<T> output) where T : unmanaged
    {
        State.Validate();
        if (output.Length != ElementCount)
            throw new ArgumentException($"output has {output.Length} elements, the tensor {ElementCount}", nameof(output));
        if (Packed.LongLength != Quant4Bit.PackedLength(ElementCount))
            throw new InvalidOperationException($"packed has {Packed.Length} bytes, expected {Quant4Bit.PackedLength(ElementCount)}");
        Quant4Bit.Dequantize(Packed, State.GetAbsmax(), output, State.QuantType, State.Blocksize);
    }

    public float[] DequantizeToSingle()
    {
        var r = new float[ElementCount];
        Dequantize<float>(r);
        return r;
    }

    public BFloat16[] DequantizeToBFloat16()
    {
        var r = new BFloat16[ElementCount];
        Dequantize<BFloat16>(r);
        return r;
    }

    public Half[] DequantizeToHalf()
    {
        var r = new Half[ElementCount];
        Dequantize<Half>(r);
        return r;
    }

    /// <summary>Dequantizes to the original dtype, as raw little-endian bytes.</summary>
    public byte[] DequantizeToOriginalDtypeBytes() => State.Dtype switch
    {
        DType.F32 => MemoryMarshal.AsBytes(DequantizeToSingle().AsSpan()).ToArray(),
        DType.BF16 => MemoryMarshal.AsBytes(DequantizeToBFloat16().AsSpan()).ToArray(),
        DType.F16 => MemoryMarshal.AsBytes(DequantizeToHalf().AsSpan()).ToArray(),
        _ => throw new InvalidOperationException($"dtype {State.Dtype} is not a 4-bit original dtype"),
    };
}
