using NativePeft.Runtime;
using System.Runtime.CompilerServices;
using System.Numerics;
using System.Numerics.Tensors;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using NativePeft.Numerics;
using NativePeft.Ops.Reference;
using NativePeft.Quantization;

namespace NativePeft.Ops;

/// <summary>
/// <see cref="IOps"/> on the CPU: the C# references of Ops/Reference over host memory, in fp32 (the CPU training
/// path) or fp64 (gradient checks against finite differences). GEMMs go through the host BLAS in fp32.
/// </summary>
public sealed unsafe class CpuOps : IOps
{
    private readonly TensorMemory _memory;

    /// <param name="memory">Where tensors live (owned: disposed with the ops); null: <see cref="HostTensorMemory"/>.</param>
    public CpuOps(TensorMemory? memory = null) => _memory = memory ?? new HostTensorMemory();

    public string Name => "CPU reference";
    public TensorMemory Memory => _memory;
    public Runtime.IGpu? Device => null;

    public double SumOfSquares(IReadOnlyList<Tensor> tensors)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        double sum = 0;
        foreach (var g in tensors)
        {
            if (g.DType != DType.F32) throw new ArgumentException($"SumOfSquares: {g} must be F32", nameof(tensors));
            foreach (float x in S<float>(g))
            {
                double d = x;
                sum += d * d;
            }
        }
        return sum;
    }

    private static Span<T> S<T>(Tensor t) where T : unmanaged => new((void*)t.Data.Address, checked((int)t.Count));

    /// <summary>
    /// The elements of <paramref name="t"/> in place when <paramref name="ops"/> keeps tensors in host memory
    /// (<see cref="HostTensorMemory"/>: CpuOps, also behind <see cref="ProfilingOps"/>), so host-side code (the
    /// optimizer, gradient clipping) can work without a Download/Upload copy; false (and an empty span) otherwise.
    /// </summary>
    public static bool TryGetHostSpan<T>(IOps ops, Tensor t, out Span<T> span) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(ops);
        ArgumentNullException.ThrowIfNull(t);
        if (ops.Memory is not HostTensorMemory || DTypes.Of<T>() != t.DType) { span = default; return false; }
        span = S<T>(t);
        return true;
    }

    private static void Require(Tensor t, string name, params DType[] dtypes)
    {
        if (Array.IndexOf(dtypes, t.DType) < 0)
            throw new ArgumentException($"{name}: dtype {t.DType} is not supported by the CPU ops here (expected {string.Join(" or ", dtypes)})", name);
    }

    /// <summary>The compute dtype of the CPU ops: F32 or F64, the same for every float tensor of one call.</summary>
    private static DType Compute(string op, params Tensor?[] tensors)
    {
        DType? d = null;
        foreach (var t in tensors)
        {
            if (t is null) continue;
            if (t.DType is not (DType.F32 or DType.F64))
                throw new ArgumentException($"{op}: {t} — the CPU ops compute in F32 or F64");
            if (d is { } e && e != t.DType)
                throw new ArgumentException($"{op}: mixed dtypes {e} and {t.DType}");
            d = t.DType;
        }
        return d ?? DType.F32;
    }

    public void Upload<T>(ReadOnlySpan<T> source, Tensor destination) where T : unmanaged
    {
        CheckElement<T>(destination);
        destination.ExpectCount(nameof(destination), source.Length);
        source.CopyTo(S<T>(destination));
    }

    public void Download<T>(Tensor source, Span<T> destination) where T : unmanaged
    {
        CheckElement<T>(source);
        if (destination.Length < source.Count)
            throw new ArgumentException($"destination holds {destination.Length} elements, {source} has {source.Count}", nameof(destination));
        S<T>(source).CopyTo(destination);
    }

    private static void CheckElement<T>(Tensor t) where T : unmanaged
    {
        if (DTypes.Of<T>() != t.DType)
            throw new ArgumentException($"{typeof(T).Name} does not match the tensor's dtype {t.DType}");
    }

    public void Fill(Tensor x, double value)
    {
        switch (x.DType)
        {
            case DType.F32: S<float>(x).Fill((float)value); break;
            case DType.F64: S<double>(x).Fill(value); break;
            case DType.BF16: S<BFloat16>(x).Fill((BFloat16)value); break;
            case DType.I32: S<int>(x).Fill(checked((int)value)); break;
            default: throw new ArgumentException($"Fill: dtype {x.DType} not supported", nameof(x));
        }
    }

    public void Copy(Tensor source, Tensor destination)
    {
        destination.ExpectCount(nameof(destination), source.Count);
        if (source.DType == destination.DType)
        {
            new Span<byte>((void*)source.Data.Address, checked((int)source.Bytes)).CopyTo(new Span<byte>((void*)destination.Data.Address, checked((int)destination.Bytes)));
            return;
        }
        if (source.DType == DType.BF16 && destination.DType == DType.F32) { WidenBf16(S<ushort>(source), S<uint>(destination)); return; }
        if (source.DType == DType.F32 && destination.DType == DType.BF16) { BFloat16.FromSingle(S<float>(source), S<BFloat16>(destination)); return; }
        double[] tmp = ToDouble(source);
        switch (destination.DType)
        {
            case DType.F32: { var d = S<float>(destination); for (int i = 0; i < tmp.Length; i++) d[i] = (float)tmp[i]; break; }
            case DType.F64: tmp.CopyTo(S<double>(destination)); break;
            case DType.BF16: { var d = S<BFloat16>(destination); for (int i = 0; i < tmp.Length; i++) d[i] = BFloat16.FromSingle((float)tmp[i]); break; }
            default: throw new ArgumentException($"Copy: dtype {destination.DType} not supported", nameof(destination));
        }
    }

    /// <summary>bf16 → fp32 (the bf16 bits are the float's high half: exact), eight at a time (the LoRA base's widening).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void WidenBf16(ReadOnlySpan<ushort> source, Span<uint> destination)
    {
        int i = 0, n = source.Length;
        if (Vector256.IsHardwareAccelerated)
        {
            ref ushort s = ref MemoryMarshal.GetReference(source);
            ref uint d = ref MemoryMarshal.GetReference(destination);
            for (; i <= n - 8; i += 8)
                Vector256.ShiftLeft(Vector256.WidenLower(Vector128.LoadUnsafe(ref s, (nuint)i).ToVector256Unsafe()), 16).StoreUnsafe(ref d, (nuint)i);
        }
        for (; i < n; i++) destination[i] = (uint)source[i] << 16;
    }

    private static double[] ToDouble(Tensor t)
    {
        var r = new double[t.Count];
        switch (t.DType)
        {
            case DType.F32: { var s = S<float>(t); for (int i = 0; i < r.Length; i++) r[i] = s[i]; break; }
            case DType.F64: S<double>(t).CopyTo(r); break;
            case DType.BF16: { var s = S<BFloat16>(t); for (int i = 0; i < r.Length; i++) r[i] = s[i].ToSingle(); break; }
            default: throw new ArgumentException($"dtype {t.DType} is not a float type");
        }
        return r;
    }

    public void Add(Tensor a, Tensor b, Tensor c)
    {
        b.ExpectCount(nameof(b), a.Count); c.ExpectCount(nameof(c), a.Count);
        // TensorPrimitives: the same elementwise IEEE operations as a scalar loop, vectorized (also below).
        if (Compute("Add", a, b, c) == DType.F32) TensorPrimitives.Add(S<float>(a), S<float>(b), S<float>(c));
        else TensorPrimitives.Add(S<double>(a), S<double>(b), S<double>(c));
    }

    public void Axpy(double alpha, Tensor x, Tensor y)
    {
        y.ExpectCount(nameof(y), x.Count);
        // y = x · alpha + y: multiply, then add (not fused), as y[i] += alpha · x[i].
        if (Compute("Axpy", x, y) == DType.F32) { var ys = S<float>(y); TensorPrimitives.MultiplyAdd(S<float>(x), (float)alpha, ys, ys); }
        else { var ys = S<double>(y); TensorPrimitives.MultiplyAdd(S<double>(x), alpha, ys, ys); }
    }

    public void Scale(Tensor x, double alpha)
    {
        if (Compute("Scale", x) == DType.F32) { var s = S<float>(x); TensorPrimitives.Multiply(s, (float)alpha, s); }
        else { var s = S<double>(x); TensorPrimitives.Multiply(s, alpha, s); }
    }

    public void Dropout(Tensor x, Tensor mask, double p, ulong seed, Tensor y)
    {
        Require(mask, nameof(mask), DType.U8);
        mask.ExpectCount(nameof(mask), x.Count); y.ExpectCount(nameof(y), x.Count);
        if (p is < 0 or >= 1) throw new ArgumentOutOfRangeException(nameof(p), p, "dropout probability must be in [0, 1)");
        var m = S<byte>(mask);
        DropoutMask(m, seed, p); // the dropout_mask kernel's Philox stream, bit for bit
        ApplyMask(x, m, p, y, "Dropout");
    }

    /// <summary>Elements per parallel chunk of <see cref="DropoutMask"/> (a multiple of 4: whole Philox blocks).</summary>
    private const int DropoutChunk = 16 * 1024;

    /// <summary>
    /// <see cref="GpuElementwiseOps.DropoutMaskHost"/> at offset 0, the same bytes, faster: one Philox-4x32-10 call per
    /// block of four elements gives the words of all four (DropoutWord(seed, e) is word e mod 4 of block e / 4), and
    /// chunks of whole blocks run in parallel (each byte depends only on its index).
    /// </summary>
    internal static void DropoutMask(Span<byte> mask, ulong seed, double p)
    {
        uint threshold = GpuElementwiseOps.DropThreshold(p);
        int n = mask.Length, chunks = (n + DropoutChunk - 1) / DropoutChunk;
        if (n == 0) return;
        fixed (byte* pm = mask)
        {
            nint at = (nint)pm;
            RefParallel.For(chunks, 16L * DropoutChunk, c =>
            {
                int start = c * DropoutChunk, end = Math.Min(n, start + DropoutChunk);
                byte* o = (byte*)at;
                for (int e = start; e < end; e += 4)
                {
                    ulong block = (ulong)e >> 2;
                    var (x0, x1, x2, x3) = GpuElementwiseOps.Philox4x32x10((uint)block, (uint)(block >> 32), 0, 0, (uint)seed, (uint)(seed >> 32));
                    o[e] = x0 >= threshold ? (byte)1 : (byte)0;
                    if (e + 1 < end) o[e + 1] = x1 >= threshold ? (byte)1 : (byte)0;
                    if (e + 2 < end) o[e + 2] = x2 >= threshold ? (byte)1 : (byte)0;
                    if (e + 3 < end) o[e + 3] = x3 >= threshold ? (byte)1 : (byte)0;
                }
            });
        }
    }

    public void DropoutBackward(Tensor dy, Tensor mask, double p, Tensor dx)
    {
        Require(mask, nameof(mask), DType.U8);
        mask.ExpectCount(nameof(mask), dy.Count); dx.ExpectCount(nameof(dx), dy.Count);
        ApplyMask(dy, S<byte>(mask), p, dx, "DropoutBackward");
    }

    private static void ApplyMask(Tensor x, Span<byte> m, double p, Tensor y, string op)
    {
        if (Compute(op, x, y) == DType.F32)
        {
            var xs = S<float>(x); var ys = S<float>(y); float k = (float)(1 / (1 - p));
            for (int i = 0; i < ys.Length; i++) ys[i] = m[i] != 0 ? xs[i] * k : 0f;
        }
        else
        {
            var xs = S<double>(x); var ys = S<double>(y); double k = 1 / (1 - p);
            for (int i = 0; i < ys.Length; i++) ys[i] = m[i] != 0 ? xs[i] * k : 0;
        }
    }

    public void Matmul(Tensor a, bool transA, Tensor b, bool transB, Tensor c, double alpha = 1, double beta = 0)
    {
        int m = transA ? a.Columns : a.Rows, k = transA ? a.Rows : a.Columns;
        int kb = transB ? b.Columns : b.Rows, n = transB ? b.Rows : b.Columns;
        if (kb != k) throw new ArgumentException($"Matmul: inner dimensions differ: op(A) is [{m}, {k}], op(B) is [{kb}, {n}]");
        if (c.Rows != m || c.Columns != n) throw new ArgumentException($"Matmul: C is [{c.Rows}, {c.Columns}], expected [{m}, {n}]");
        if (Compute("Matmul", a, b, c) == DType.F32)
        {
            HostBlas.Sgemm(transA, transB, m, n, k, (float)alpha, S<float>(a), S<float>(b), (float)beta, S<float>(c));
            return;
        }
        double* pa = (double*)a.Data.Address, pb = (double*)b.Data.Address, pc = (double*)c.Data.Address;
        Parallel.For(0, m, i =>
        {
            for (int j = 0; j < n; j++)
            {
                double s = 0;
                for (int p = 0; p < k; p++)
                    s += (transA ? pa[(long)p * m + i] : pa[(long)i * k + p]) * (transB ? pb[(long)j * k + p] : pb[(long)p * n + j]);
                long ci = (long)i * n + j;
                pc[ci] = alpha * s + (beta == 0 ? 0 : beta * pc[ci]);
            }
        });
    }

    // --- LoRA ------------------------------------------------------------------------------------

    /// <summary>The unfused sequence (Dropout, GEMM) per adapter, in the compute dtype (F32 or F64) of x, A and Xa.</summary>
    public void LoraDown(Tensor x, IReadOnlyList<LoraDownArgs> adapters)
    {
        LoraChecks.Down(x, adapters);
        foreach (var d in adapters) Compute("LoraDown", x, d.A, d.Xa);
        LoraUnfused.Down(this, x, adapters);
    }

    /// <summary>The unfused sequence per adapter; every tensor in the compute dtype (F32 or F64), DA included.</summary>
    public void LoraBackwardInput(Tensor x, IReadOnlyList<LoraBackwardArgs> adapters, Tensor dx)
    {
        LoraChecks.Backward(x, adapters, dx);
        foreach (var d in adapters) Compute("LoraBackwardInput", x, dx, d.A, d.DXa, d.DA);
        LoraUnfused.Backward(this, x, adapters, dx);
    }

    public void Dequantize4bit(QuantizedWeight weight, int firstRow, Tensor output)
    {
        long first = (long)firstRow * weight.Columns, n = output.Count;
        if (output.Columns != weight.Columns || firstRow < 0 || firstRow + output.Rows > weight.Rows)
            throw new ArgumentException($"Dequantize4bit: rows [{firstRow}, {firstRow + output.Rows}) x {output.Columns} outside the [{weight.Rows}, {weight.Columns}] weight");
        if (first % weight.Blocksize != 0)
            throw new ArgumentException($"Dequantize4bit: row {firstRow} does not start a block of {weight.Blocksize}");
        var packed = S<byte>(weight.Packed).Slice(checked((int)(first / 2)));
        long firstBlock = first / weight.Blocksize;
        ReadOnlySpan<float> absmax;
        if (weight.DoubleQuant is { } dq)
        {
            // Decode the blocks of this row range from the double-quantized state (the device copy stays 8-bit).
            var decoded = new float[Quant4Bit.BlockCount(n, weight.Blocksize)];
            DoubleQuantState.Decode(S<byte>(dq.Absmax), S<float>(dq.NestedAbsmax), S<float>(dq.NestedQuantMap), S<float>(dq.NestedOffset)[0],
                DoubleQuantAbsmax.NestedBlocksize, firstBlock, decoded);
            absmax = decoded;
        }
        else absmax = S<float>(weight.Absmax ?? throw new ArgumentException("Dequantize4bit: the weight has neither absmax nor a double-quantized state", nameof(weight)))
            .Slice(checked((int)firstBlock));
        switch (output.DType)
        {
            case DType.F32: Quant4Bit.Dequantize(packed, absmax, S<float>(output), weight.QuantType, weight.Blocksize); break;
            case DType.F64:
                var tmp = new float[n];
                Quant4Bit.Dequantize(packed, absmax, tmp, weight.QuantType, weight.Blocksize);
                var o = S<double>(output);
                for (int i = 0; i < n; i++) o[i] = tmp[i];
                break;
            default: throw new ArgumentException($"Dequantize4bit: output dtype {output.DType} not supported on the CPU", nameof(output));
        }
    }

    /// <summary>No one-token 4-bit kernel on the CPU reference: the layer dequantizes and multiplies.</summary>
    public bool TryGemv4bit(Tensor x, QuantizedWeight weight, Tensor y) => false;

    public void RmsNormForward(Tensor x, Tensor weight, Tensor y, Tensor rstd, double eps)
    {
        int rows = x.Rows, cols = x.Columns;
        if (Compute("RmsNormForward", x, weight, y, rstd) == DType.F32)
            RmsNormRef.Forward<float>(S<float>(x), S<float>(weight), S<float>(y), S<float>(rstd), rows, cols, eps);
        else
            RmsNormRef.Forward<double>(S<double>(x), S<double>(weight), S<double>(y), S<double>(rstd), rows, cols, eps);
    }

    public void RmsNormBackward(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor dx, Tensor? dweight, bool accumulate = false)
    {
        int rows = x.Rows, cols = x.Columns;
        if (accumulate && (dx.Data == dy.Data || dx.Data == x.Data))
            throw new ArgumentException("dx: accumulating into dx needs a buffer apart from dy and x", nameof(dx));
        if (Compute("RmsNormBackward", dy, x, weight, rstd, dx, dweight) == DType.F32)
            RmsNormRef.Backward<float>(S<float>(dy), S<float>(x), S<float>(weight), S<float>(rstd), S<float>(dx), dweight is null ? default : S<float>(dweight), rows, cols, accumulate);
        else
            RmsNormRef.Backward<double>(S<double>(dy), S<double>(x), S<double>(weight), S<double>(rstd), S<double>(dx), dweight is null ? default : S<double>(dweight), rows, cols, accumulate);
    }

    public void RopeForward(Tensor x, Tensor positions, Tensor cos, Tensor sin, int heads, int headDim) => Rope(x, positions, cos, sin, heads, headDim, false);
    public void RopeBackward(Tensor dx, Tensor positions, Tensor cos, Tensor sin, int heads, int headDim) => Rope(dx, positions, cos, sin, heads, headDim, true);

    private static void Rope(Tensor x, Tensor positions, Tensor cos, Tensor sin, int heads, int headDim, bool backward)
    {
        Require(positions, nameof(positions), DType.I32);
        int tokens = positions.Rows * positions.Columns;
        x.ExpectCount(nameof(x), (long)tokens * heads * headDim);
        var pos = S<int>(positions);
        if (Compute("Rope", x, cos, sin) == DType.F32)
        {
            var xs = S<float>(x);
            if (backward) RopeRef.BackwardFromTables<float>(xs, pos, S<float>(cos), S<float>(sin), xs, tokens, heads, headDim);
            else RopeRef.ForwardFromTables<float>(xs, pos, S<float>(cos), S<float>(sin), xs, tokens, heads, headDim);
        }
        else
        {
            var xs = S<double>(x);
            if (backward) RopeRef.BackwardFromTables<double>(xs, pos, S<double>(cos), S<double>(sin), xs, tokens, heads, headDim);
            else RopeRef.ForwardFromTables<double>(xs, pos, S<double>(cos), S<double>(sin), xs, tokens, heads, headDim);
        }
    }

    public void AttentionForward(Tensor q, Tensor k, Tensor v, Tensor output, Tensor lse, int batch, int seqLen, int headsQ, int headsKv, int headDim,
        Tensor? positions = null)
    {
        var pos = Positions(positions, batch, seqLen);
        if (Compute("AttentionForward", q, k, v, output, lse) == DType.F32)
            AttentionRef.Forward<float>(S<float>(q), S<float>(k), S<float>(v), S<float>(output), S<float>(lse), pos, batch, seqLen, headsQ, headsKv, headDim);
        else
            AttentionRef.Forward<double>(S<double>(q), S<double>(k), S<double>(v), S<double>(output), S<double>(lse), pos, batch, seqLen, headsQ, headsKv, headDim);
    }

    /// <summary>The packed-sequence positions as a span (empty for null), I32 [B·T].</summary>
    private static ReadOnlySpan<int> Positions(Tensor? positions, int batch, int seqLen)
    {
        if (positions is null) return default;
        Require(positions, nameof(positions), DType.I32);
        positions.ExpectCount(nameof(positions), (long)batch * seqLen);
        return S<int>(positions);
    }

    public void AttentionForwardCached(Tensor q, Tensor k, Tensor v, Tensor output, Tensor? lse, int batch, int queryLen, int keyLen,
        int headsQ, int headsKv, int headDim, Tensor? workspace = null)
    {
        if (Compute("AttentionForwardCached", q, k, v, output, lse) == DType.F32)
            AttentionRef.ForwardCached<float>(S<float>(q), S<float>(k), S<float>(v), S<float>(output), lse is null ? default : S<float>(lse),
                batch, queryLen, keyLen, headsQ, headsKv, headDim);
        else
            AttentionRef.ForwardCached<double>(S<double>(q), S<double>(k), S<double>(v), S<double>(output), lse is null ? default : S<double>(lse),
                batch, queryLen, keyLen, headsQ, headsKv, headDim);
    }

    public void AttentionBackward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor output, Tensor lse, Tensor dq, Tensor dk, Tensor dv,
        int batch, int seqLen, int headsQ, int headsKv, int headDim, Tensor? positions = null)
    {
        var pos = Positions(positions, batch, seqLen);
        if (Compute("AttentionBackward", dout, q, k, v, output, lse, dq, dk, dv) == DType.F32)
            AttentionRef.Backward<float>(S<float>(dout), S<float>(q), S<float>(k), S<float>(v), S<float>(output), S<float>(lse),
                S<float>(dq), S<float>(dk), S<float>(dv), pos, batch, seqLen, headsQ, headsKv, headDim);
        else
            AttentionRef.Backward<double>(S<double>(dout), S<double>(q), S<double>(k), S<double>(v), S<double>(output), S<double>(lse),
                S<double>(dq), S<double>(dk), S<double>(dv), pos, batch, seqLen, headsQ, headsKv, headDim);
    }

    public void SwiGluForward(Tensor gate, Tensor up, Tensor h)
    {
        if (Compute("SwiGluForward", gate, up, h) == DType.F32)
            SwiGluRef.Forward<float>(S<float>(gate), S<float>(up), S<float>(h), gate.Rows, gate.Columns);
        else
            SwiGluRef.Forward<double>(S<double>(gate), S<double>(up), S<double>(h), gate.Rows, gate.Columns);
    }

    public void SwiGluBackward(Tensor dh, Tensor gate, Tensor up, Tensor dgate, Tensor dup)
    {
        if (Compute("SwiGluBackward", dh, gate, up, dgate, dup) == DType.F32)
            SwiGluRef.Backward<float>(S<float>(dh), S<float>(gate), S<float>(up), S<float>(dgate), S<float>(dup), gate.Rows, gate.Columns);
        else
            SwiGluRef.Backward<double>(S<double>(dh), S<double>(gate), S<double>(up), S<double>(dgate), S<double>(dup), gate.Rows, gate.Columns);
    }

    public void EmbeddingForward(Tensor ids, Tensor table, Tensor output)
    {
        Require(ids, nameof(ids), DType.I32);
        if (Compute("EmbeddingForward", table, output) == DType.F32)
            EmbeddingRef.Forward<float>(S<int>(ids), S<float>(table), S<float>(output), table.Rows, table.Columns);
        else
            EmbeddingRef.Forward<double>(S<int>(ids), S<double>(table), S<double>(output), table.Rows, table.Columns);
    }

    public void EmbeddingBackward(Tensor ids, Tensor dout, Tensor dtable)
    {
        Require(ids, nameof(ids), DType.I32);
        if (Compute("EmbeddingBackward", dout, dtable) == DType.F32)
            EmbeddingRef.Backward<float>(S<int>(ids), S<float>(dout), S<float>(dtable), dtable.Rows, dtable.Columns);
        else
            EmbeddingRef.Backward<double>(S<int>(ids), S<double>(dout), S<double>(dtable), dtable.Rows, dtable.Columns);
    }

    public (double Loss, int Count) CrossEntropyForward(Tensor hidden, Tensor weight, Tensor labels, Tensor lse, int chunk)
    {
        Require(labels, nameof(labels), DType.I32);
        if (Compute("CrossEntropyForward", hidden, weight, lse) == DType.F32)
            return CrossEntropyRef.Forward<float>(S<float>(hidden), S<float>(weight), S<int>(labels), S<float>(lse), hidden.Rows, hidden.Columns, weight.Rows, chunk);
        return CrossEntropyRef.Forward<double>(S<double>(hidden), S<double>(weight), S<int>(labels), S<double>(lse), hidden.Rows, hidden.Columns, weight.Rows, chunk);
    }

    public void CrossEntropyBackward(Tensor hidden, Tensor weight, Tensor labels, Tensor lse, double dloss, Tensor dhidden, Tensor? dweight, int chunk)
    {
        Require(labels, nameof(labels), DType.I32);
        if (Compute("CrossEntropyBackward", hidden, weight, lse, dhidden, dweight) == DType.F32)
            CrossEntropyRef.Backward<float>(S<float>(hidden), S<float>(weight), S<int>(labels), S<float>(lse), (float)dloss, S<float>(dhidden),
                dweight is null ? default : S<float>(dweight), hidden.Rows, hidden.Columns, weight.Rows, chunk);
        else
            CrossEntropyRef.Backward<double>(S<double>(hidden), S<double>(weight), S<int>(labels), S<double>(lse), dloss, S<double>(dhidden),
                dweight is null ? default : S<double>(dweight), hidden.Rows, hidden.Columns, weight.Rows, chunk);
    }

    public void Dispose() => _memory.Dispose();
}
