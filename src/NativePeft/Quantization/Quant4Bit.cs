using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Numerics.Tensors;
using NativePeft.Numerics;

namespace NativePeft.Quantization;

/// <summary>
/// Blockwise NF4/FP4 quantization on the CPU: the reference the CUDA kernels must match bit for bit
/// (docs/quant-contract.md). Layout as bitsandbytes: blocks of <c>blocksize</c> consecutive elements of the
/// flattened tensor, one fp32 absmax per block, two 4-bit codes per byte with element 2j in the HIGH nibble.
/// <para>Span overloads run on the calling thread; Memory overloads split large tensors over threads (chunks of
/// whole blocks; the result is identical).</para>
/// </summary>
public static class Quant4Bit
{
    public const int MinBlocksize = 32;
    public const int MaxBlocksize = 4096;

    /// <summary>Elements per parallel work item (rounded to whole blocks).</summary>
    private const int ElementsPerChunk = 1 << 16;

    /// <summary>Throws <see cref="ArgumentException"/> (naming "blocksize") unless blocksize is a power of two in 32..4096.</summary>
    public static void ValidateBlocksize(int blocksize)
    {
        if (blocksize < MinBlocksize || blocksize > MaxBlocksize || !BitOperations.IsPow2(blocksize))
            throw new ArgumentException(
                $"blocksize must be a power of two from {MinBlocksize} to {MaxBlocksize}, got {blocksize}", nameof(blocksize));
    }

    /// <summary>Bytes of packed 4-bit data for n elements: (n + 1) / 2.</summary>
    public static long PackedLength(long n) => (n + 1) / 2;

    /// <summary>Number of blocks (absmax entries): ceil(n / blocksize).</summary>
    public static long BlockCount(long n, int blocksize) => (n + blocksize - 1) / blocksize;

    // ---------------------------------------------------------------- quantize

    public static void Quantize(ReadOnlySpan<float> values, Span<byte> packed, Span<float> absmax, QuantType quantType, int blocksize)
        => QuantizeChecked(values, packed, absmax, quantType, blocksize);

    public static void Quantize(ReadOnlySpan<BFloat16> values, Span<byte> packed, Span<float> absmax, QuantType quantType, int blocksize)
        => QuantizeChecked(values, packed, absmax, quantType, blocksize);

    public static void Quantize(ReadOnlySpan<Half> values, Span<byte> packed, Span<float> absmax, QuantType quantType, int blocksize)
        => QuantizeChecked(values, packed, absmax, quantType, blocksize);

    /// <summary>Parallel over chunks of blocks. T is float, BFloat16 or Half.</summary>
    public static void Quantize<T>(ReadOnlyMemory<T> values, Memory<byte> packed, Memory<float> absmax, QuantType quantType, int blocksize)
        where T : unmanaged
    {
        CheckArgs(values.Length, packed.Length, absmax.Length, quantType, blocksize);
        CheckElementType<T>();
        ForBlockChunks(values.Length, blocksize, (first, end) =>
            QuantizeBlocks(values.Span, packed.Span, absmax.Span, quantType, blocksize, first, end));
    }

    /// <summary>
    /// Runs <paramref name="blocks"/>(first, end) over the ceil(n / blocksize) blocks: in one call when they fit one
    /// chunk of <see cref="ElementsPerChunk"/> elements, else in parallel over chunks of whole blocks.
    /// </summary>
    private static void ForBlockChunks(int n, int blocksize, Action<int, int> blocks)
    {
        int count = (int)BlockCount(n, blocksize);
        int blocksPerChunk = Math.Max(1, ElementsPerChunk / blocksize);
        int chunks = (count + blocksPerChunk - 1) / blocksPerChunk;
        if (chunks <= 1)
        {
            blocks(0, count);
            return;
        }
        Parallel.For(0, chunks, c =>
        {
            int first = c * blocksPerChunk;
            blocks(first, Math.Min(count, first + blocksPerChunk));
        });
    }

    private static void QuantizeChecked<T>(ReadOnlySpan<T> values, Span<byte> packed, Span<float> absmax, QuantType quantType, int blocksize)
        where T : unmanaged
    {
        CheckArgs(values.Length, packed.Length, absmax.Length, quantType, blocksize);
        QuantizeBlocks(values, packed, absmax, quantType, blocksize, 0, (int)BlockCount(values.Length, blocksize));
    }

    private static void CheckArgs(int n, int packedLength, int absmaxLength, QuantType quantType, int blocksize)
    {
        ValidateBlocksize(blocksize);
        if (quantType is not (QuantType.Nf4 or QuantType.Fp4))
            throw new ArgumentOutOfRangeException(nameof(quantType), quantType, "unknown quant_type");
        if (packedLength < PackedLength(n))
            throw new ArgumentException($"packed needs {PackedLength(n)} bytes for {n} elements, got {packedLength}", "packed");
        if (absmaxLength < BlockCount(n, blocksize))
            throw new ArgumentException($"absmax needs {BlockCount(n, blocksize)} entries for {n} elements with blocksize {blocksize}, got {absmaxLength}", "absmax");
    }

    private static void CheckElementType<T>()
    {
        if (typeof(T) != typeof(float) && typeof(T) != typeof(BFloat16) && typeof(T) != typeof(Half))
            throw new NotSupportedException($"4-bit quantization takes float, BFloat16 or Half, not {typeof(T).Name}");
    }

    /// <summary>Quantizes blocks [firstBlock, endBlock): the one code path of every overload.</summary>
    private static void QuantizeBlocks<T>(ReadOnlySpan<T> values, Span<byte> packed, Span<float> absmax,
        QuantType quantType, int blocksize, int firstBlock, int endBlock) where T : unmanaged
    {
        Span<float> converted = typeof(T) == typeof(float) ? default : stackalloc float[blocksize];
        Span<int> codes = stackalloc int[blocksize + 1];
        int n = values.Length;
        for (int b = firstBlock; b < endBlock; b++)
        {
            int start = b * blocksize;
            int len = Math.Min(blocksize, n - start);
            ReadOnlySpan<float> x = ToSingle(values.Slice(start, len), converted);
            absmax[b] = QuantizeBlock(x, packed.Slice(start / 2, (len + 1) / 2), codes, quantType);
        }
    }

    private static ReadOnlySpan<float> ToSingle<T>(ReadOnlySpan<T> source, Span<float> buffer) where T : unmanaged
    {
        if (typeof(T) == typeof(float))
            return MemoryMarshal.Cast<T, float>(source);
        Span<float> dst = buffer[..source.Length];
        if (typeof(T) == typeof(BFloat16))
            BFloat16.ToSingle(MemoryMarshal.Cast<T, BFloat16>(source), dst);
        else if (typeof(T) == typeof(Half))
            TensorPrimitives.ConvertToSingle(MemoryMarshal.Cast<T, Half>(source), dst);
        else
            throw new NotSupportedException($"4-bit quantization takes float, BFloat16 or Half, not {typeof(T).Name}");
        return dst;
    }

    /// <summary>Quantizes one block (fp32), writes (len+1)/2 packed bytes, returns absmax.</summary>
    private static float QuantizeBlock(ReadOnlySpan<float> x, Span<byte> packed, Span<int> codes, QuantType quantType)
    {
        int len = x.Length;
        float m = MathF.Abs(TensorPrimitives.MaxMagnitude(x));
        if (m == 0f)
        {
            // All-zero block: absmax 0 and every nibble 0, as bitsandbytes' CUDA kernel stores it (contract step 5).
            packed.Clear();
            return 0f;
        }
        float inv = 1.0f / m;
        if (quantType == QuantType.Nf4)
            CodesNf4(x, inv, codes);
        else
            CodesFp4(x, inv, codes);
        if ((len & 1) != 0)
            codes[len] = FourBitCode.ZeroCode(quantType); // the padded 0.0f of the last block (contract step 6)
        for (int j = 0; j < packed.Length; j++)
            packed[j] = (byte)((codes[2 * j] << 4) | codes[2 * j + 1]);
        return m;
    }

    private static void CodesNf4(ReadOnlySpan<float> x, float inv, Span<int> codes)
    {
        ReadOnlySpan<float> t = FourBitCode.Nf4Thresholds;
        int i = 0;
        if (Vector.IsHardwareAccelerated && x.Length >= Vector<float>.Count)
        {
            var vinv = new Vector<float>(inv);
            ReadOnlySpan<Vector<float>> vt = Nf4ThresholdVectors;
            for (; i <= x.Length - Vector<float>.Count; i += Vector<float>.Count)
            {
                Vector<float> v = new Vector<float>(x[i..]) * vinv;
                Vector<int> count = Vector<int>.Zero;
                for (int k = 0; k < vt.Length; k++)
                    count += Vector.GreaterThan(v, vt[k]); // -1 per threshold passed
                (-count).CopyTo(codes[i..]);
            }
        }
        for (; i < x.Length; i++)
            codes[i] = FourBitCode.QuantizeNf4(x[i] * inv);
    }

    private static void CodesFp4(ReadOnlySpan<float> x, float inv, Span<int> codes)
    {
        ReadOnlySpan<byte> nibble = Fp4NibbleBySignAndRank;
        int i = 0;
        if (Vector.IsHardwareAccelerated && x.Length >= Vector<float>.Count)
        {
            var vinv = new Vector<float>(inv);
            var eight = new Vector<int>(8);
            ReadOnlySpan<Vector<float>> vt = Fp4ThresholdVectors;
            for (; i <= x.Length - Vector<float>.Count; i += Vector<float>.Count)
            {
                Vector<float> v = new Vector<float>(x[i..]) * vinv;
                Vector<int> sign = Vector.LessThan(v, Vector<float>.Zero) & eight;
                Vector<float> a = Vector.Abs(v);
                Vector<int> rank = Vector<int>.Zero;
                for (int k = 0; k < vt.Length; k++)
                    rank += Vector.GreaterThan(a, vt[k]);
                (sign - rank).CopyTo(codes[i..]); // sign | rank, rank in 0..7
            }
            for (int k = 0; k < i; k++)
                codes[k] = nibble[codes[k]];
        }
        for (; i < x.Length; i++)
            codes[i] = FourBitCode.QuantizeFp4(x[i] * inv);
    }

    private static readonly Vector<float>[] Nf4ThresholdVectorArray = MakeVectors(FourBitCode.Nf4Thresholds);
    private static readonly Vector<float>[] Fp4ThresholdVectorArray = MakeVectors(FourBitCode.Fp4Thresholds);
    private static ReadOnlySpan<Vector<float>> Nf4ThresholdVectors => Nf4ThresholdVectorArray;
    private static ReadOnlySpan<Vector<float>> Fp4ThresholdVectors => Fp4ThresholdVectorArray;

    private static Vector<float>[] MakeVectors(ReadOnlySpan<float> values)
    {
        var r = new Vector<float>[values.Length];
        for (int i = 0; i < values.Length; i++)
            r[i] = new Vector<float>(values[i]);
        return r;
    }

    /// <summary>FP4 nibble by (sign ? 8 : 0) | rank.</summary>
    private static ReadOnlySpan<byte> Fp4NibbleBySignAndRank =>
        [0b0000, 0b0001, 0b0110, 0b0111, 0b0100, 0b0101, 0b0010, 0b0011,
         0b1000, 0b1001, 0b1110, 0b1111, 0b1100, 0b1101, 0b1010, 0b1011];

    // ---------------------------------------------------------------- dequantize

    /// <summary>output[i] = code[nibble i] * absmax[i / blocksize] (fp32); output.Length is the element count n.</summary>
    public static void Dequantize(ReadOnlySpan<byte> packed, ReadOnlySpan<float> absmax, Span<float> output, QuantType quantType, int blocksize)
        => DequantizeChecked(packed, absmax, output, quantType, blocksize);

    /// <summary>As the fp32 overload, then round-to-nearest-even to bf16.</summary>
    public static void Dequantize(ReadOnlySpan<byte> packed, ReadOnlySpan<float> absmax, Span<BFloat16> output, QuantType quantType, int blocksize)
        => DequantizeChecked(packed, absmax, output, quantType, blocksize);

    /// <summary>As the fp32 overload, then IEEE round-to-nearest-even to fp16.</summary>
    public static void Dequantize(ReadOnlySpan<byte> packed, ReadOnlySpan<float> absmax, Span<Half> output, QuantType quantType, int blocksize)
        => DequantizeChecked(packed, absmax, output, quantType, blocksize);

    /// <summary>Parallel over chunks of blocks. T is float, BFloat16 or Half.</summary>
    public static void Dequantize<T>(ReadOnlyMemory<byte> packed, ReadOnlyMemory<float> absmax, Memory<T> output, QuantType quantType, int blocksize)
        where T : unmanaged
    {
        CheckArgs(output.Length, packed.Length, absmax.Length, quantType, blocksize);
        CheckElementType<T>();
        ForBlockChunks(output.Length, blocksize, (first, end) =>
            DequantizeBlocks(packed.Span, absmax.Span, output.Span, quantType, blocksize, first, end));
    }

    private static void DequantizeChecked<T>(ReadOnlySpan<byte> packed, ReadOnlySpan<float> absmax, Span<T> output, QuantType quantType, int blocksize)
        where T : unmanaged
    {
        CheckArgs(output.Length, packed.Length, absmax.Length, quantType, blocksize);
        DequantizeBlocks(packed, absmax, output, quantType, blocksize, 0, (int)BlockCount(output.Length, blocksize));
    }

    private static void DequantizeBlocks<T>(ReadOnlySpan<byte> packed, ReadOnlySpan<float> absmax, Span<T> output,
        QuantType quantType, int blocksize, int firstBlock, int endBlock) where T : unmanaged
    {
        ReadOnlySpan<float> code = FourBitCode.Code(quantType);
        Span<float> products = stackalloc float[16];
        Span<T> table = stackalloc T[16];
        int n = output.Length;
        for (int b = firstBlock; b < endBlock; b++)
        {
            float a = absmax[b];
            for (int k = 0; k < 16; k++)
                products[k] = code[k] * a; // fp32 multiply, once per code value
            FromSingle(products, table);
            int start = b * blocksize;
            int len = Math.Min(blocksize, n - start);
            Span<T> o = output.Slice(start, len);
            ReadOnlySpan<byte> p = packed.Slice(start / 2, (len + 1) / 2);
            int pairs = len / 2;
            for (int j = 0; j < pairs; j++)
            {
                byte v = p[j];
                o[2 * j] = table[v >> 4];
                o[2 * j + 1] = table[v & 15];
            }
            if ((len & 1) != 0)
                o[len - 1] = table[p[pairs] >> 4];
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void FromSingle<T>(ReadOnlySpan<float> source, Span<T> destination) where T : unmanaged
    {
        if (typeof(T) == typeof(float))
            source.CopyTo(MemoryMarshal.Cast<T, float>(destination));
        else if (typeof(T) == typeof(BFloat16))
            BFloat16.FromSingle(source, MemoryMarshal.Cast<T, BFloat16>(destination));
        else if (typeof(T) == typeof(Half))
        {
            Span<Half> d = MemoryMarshal.Cast<T, Half>(destination);
            for (int i = 0; i < source.Length; i++)
                d[i] = (Half)source[i];
        }
        else
            throw new NotSupportedException($"4-bit dequantization writes float, BFloat16 or Half, not {typeof(T).Name}");
    }
}
