using NativePeft.Numerics;
using NativePeft.Quantization;

namespace NativePeft.Tests.Ops;

/// <summary>The CPU reference (NativePeft.Quantization) in the shapes the GPU op tests compare with.</summary>
internal static class CpuReference
{
    public static (byte[] Packed, float[] Absmax) Quantize(QuantType qt, object values, int blocksize)
    {
        long n = values switch { float[] f => f.Length, BFloat16[] b => b.Length, Half[] h => h.Length, _ => throw new ArgumentException("type") };
        var packed = new byte[Quant4Bit.PackedLength(n)];
        var absmax = new float[Quant4Bit.BlockCount(n, blocksize)];
        switch (values)
        {
            case float[] f: Quant4Bit.Quantize(f, packed, absmax, qt, blocksize); break;
            case BFloat16[] b: Quant4Bit.Quantize(b, packed, absmax, qt, blocksize); break;
            case Half[] h: Quant4Bit.Quantize(h, packed, absmax, qt, blocksize); break;
        }
        return (packed, absmax);
    }

    public static T[] Dequantize<T>(QuantType qt, byte[] packed, float[] absmax, int blocksize, int n) where T : unmanaged
    {
        var output = new T[n];
        switch (output)
        {
            case float[] f: Quant4Bit.Dequantize(packed, absmax, f, qt, blocksize); break;
            case BFloat16[] b: Quant4Bit.Dequantize(packed, absmax, b, qt, blocksize); break;
            case Half[] h: Quant4Bit.Dequantize(packed, absmax, h, qt, blocksize); break;
            default: throw new ArgumentException("type");
        }
        return output;
    }
}
