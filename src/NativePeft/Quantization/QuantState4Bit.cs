using NativePeft.Numerics;

namespace NativePeft.Quantization;

/// <summary>
/// What bitsandbytes' QuantState holds for a 4-bit tensor: quant_type, blocksize, the original dtype (also the dtype
/// dequantization returns), the shape, absmax (fp32) or its double-quant state, and the 16-entry quant_map.
/// Exactly one of <see cref="Absmax"/> and <see cref="Nested"/> is set.
/// </summary>
public sealed record QuantState4Bit
{
    public required QuantType QuantType { get; init; }
    public required int Blocksize { get; init; }
    /// <summary>Original dtype: F32, BF16 or F16.</summary>
    public required DType Dtype { get; init; }
    public required long[] Shape { get; init; }
    /// <summary>fp32 absmax per block, when not double-quantized.</summary>
    public float[]? Absmax { get; init; }
    /// <summary>Double-quantized absmax, when compress_statistics was used.</summary>
    public DoubleQuantState? Nested { get; init; }
    /// <summary>The 16-value code stored as weight.quant_map (<see cref="FourBitCode.QuantMap"/>). Dequantization uses
    /// the literal code table of the quant_type, as bitsandbytes' CUDA kernels do.</summary>
    public required float[] QuantMap { get; init; }

    public bool IsDoubleQuant => Nested is not null;

    /// <summary>Product of <see cref="Shape"/>.</summary>
    public long ElementCount => DTypes.ElementCount(Shape);

    public long BlockCount => Quant4Bit.BlockCount(ElementCount, Blocksize);

    /// <summary>fp32 absmax, decoding the double-quant state if needed.</summary>
    public float[] GetAbsmax() => Nested is { } nested ? nested.Decode() : Absmax!;

    /// <summary>Throws <see cref="ArgumentException"/> if the fields are inconsistent.</summary>
    public void Validate()
    {
        Quant4Bit.ValidateBlocksize(Blocksize);
        if (QuantType is not (QuantType.Nf4 or QuantType.Fp4))
            throw new ArgumentException($"unknown quant_type {QuantType}");
        if (Dtype is not (DType.F32 or DType.BF16 or DType.F16))
            throw new ArgumentException($"dtype must be float32, bfloat16 or float16, got {Dtype.TorchName()}");
        long n = ElementCount;
        if (n > int.MaxValue)
            throw new ArgumentException($"shape has {n} elements; at most {int.MaxValue} are supported");
        if (QuantMap.Length != 16)
            throw new ArgumentException($"quant_map must have 16 entries, got {QuantMap.Length}");
        if ((Absmax is null) == (Nested is null))
            throw new ArgumentException("exactly one of absmax and the double-quant state must be set");
        long blocks = BlockCount;
        long have = Absmax?.LongLength ?? Nested!.QuantizedAbsmax.LongLength;
        if (have != blocks)
            throw new ArgumentException($"absmax must have {blocks} entries (ceil({n} / {Blocksize})), got {have}");
        Nested?.Validate();
    }
}
