using System.Runtime.CompilerServices;
using System.Numerics;
using System.Numerics.Tensors;

namespace NativePeft.Ops.Reference;

/// <summary>
/// Causal scaled-dot-product attention with grouped-query heads (GQA), forward and backward, as a plain CPU
/// reference that works the way the kernels do: one (b, h, t) query row at a time with an online softmax, never a
/// T×T score matrix; the backward recomputes the probabilities from the forward's log-sum-exp (flash-attention-2).
/// <para>
/// Layouts (row-major): q[B, T, Hq, D], k[B, T, Hkv, D], v[B, T, Hkv, D], out/dout/dq[B, T, Hq, D],
/// dk/dv[B, T, Hkv, D], lse[B, Hq, T]. Query head h reads kv head h / (Hq / Hkv) (HF repeat_kv order).
/// scale = 1/sqrt(D); query t attends to keys s &lt;= t. All arithmetic (dot products, softmax, sums) is in T:
/// the float path accumulates in float, as the kernels do.
/// </para>
/// <para>
/// Parallel over (b, h) in the forward and over (b, kv head) in the backward (a kv head's dk/dv sum over its
/// query-head group in a fixed order), so results are bit-identical for any degree of parallelism.
/// Allocation: one D-length accumulator per work item.
/// </para>
/// <para>
/// Packed sequences: the overloads with <c>positions</c> (I32 [B, T], each token's position inside its document, see
/// <see cref="ValidatePositions"/>) let query t see only keys s with t − positions[t] ≤ s ≤ t: its own document up
/// to itself. A row's loop then runs over exactly the keys, in the same order, as the document alone would. Empty
/// positions: causal, as the overloads without them.
/// </para>
/// </summary>
public static class AttentionRef
{
    /// <summary>
    /// out[b, t, h, :] = sum_{s&lt;=t} softmax_s(scale · q[b,t,h,:]·k[b,s,g,:]) · v[b,s,g,:] with g = h / (Hq/Hkv),
    /// and lse[b, h, t] = log sum_{s&lt;=t} exp(scale · q·k) (the natural-log log-sum-exp of the scaled scores).
    /// Span lengths must be at least the sizes in the class doc.
    /// </summary>
    /// <param name="maxDegreeOfParallelism">-1: the thread pool decides; 1: sequential. Never changes results.</param>
    public static void Forward<T>(ReadOnlySpan<T> q, ReadOnlySpan<T> k, ReadOnlySpan<T> v, Span<T> output, Span<T> lse,
        int batch, int seqLen, int headsQ, int headsKv, int headDim, int maxDegreeOfParallelism = -1)
        where T : unmanaged, IFloatingPointIeee754<T> =>
        Forward(q, k, v, output, lse, default, batch, seqLen, headsQ, headsKv, headDim, maxDegreeOfParallelism);

    /// <summary>
    /// <see cref="Forward{T}(ReadOnlySpan{T}, ReadOnlySpan{T}, ReadOnlySpan{T}, Span{T}, Span{T}, int, int, int, int, int, int)"/>
    /// over packed documents: query t sees keys t − positions[t] … t (positions I32 [B, T], empty = causal).
    /// </summary>
    public static unsafe void Forward<T>(ReadOnlySpan<T> q, ReadOnlySpan<T> k, ReadOnlySpan<T> v, Span<T> output, Span<T> lse,
        ReadOnlySpan<int> positions, int batch, int seqLen, int headsQ, int headsKv, int headDim, int maxDegreeOfParallelism = -1)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        var shape = CheckForwardArgs<T>(q, k, v, output, lse, positions, batch, seqLen, headsQ, headsKv, headDim);
        if (shape.QLength == 0) return;
        fixed (T* pq = q, pk = k, pv = v, po = output, pl = lse)
        fixed (int* pp = positions)
        {
            var work = new ForwardWork<T>(shape, seqLen, seqLen, pq, pk, pv, po, pl, positions.IsEmpty ? null : pp);
            Run(batch * headsQ, maxDegreeOfParallelism, work.Run);
        }
    }

    /// <summary>
    /// Attention for queries at an offset (decoding with a KV cache): <paramref name="queryLen"/> new queries at absolute
    /// positions [keyLen − queryLen, keyLen) attend causally to <paramref name="keyLen"/> keys. q, output
    /// [B, queryLen, Hq, D]; k, v [B, keyLen, Hkv, D]; lse [B, Hq, queryLen], or empty to skip it. Query row i gives
    /// exactly what row keyLen − queryLen + i of <see cref="O:NativePeft.Ops.Reference.AttentionRef.Forward"/> over the full sequence gives (the same
    /// operations in the same order); queryLen = keyLen is <see cref="O:NativePeft.Ops.Reference.AttentionRef.Forward"/>.
    /// </summary>
    public static unsafe void ForwardCached<T>(ReadOnlySpan<T> q, ReadOnlySpan<T> k, ReadOnlySpan<T> v, Span<T> output, Span<T> lse,
        int batch, int queryLen, int keyLen, int headsQ, int headsKv, int headDim, int maxDegreeOfParallelism = -1)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        ArgumentOutOfRangeException.ThrowIfNegative(queryLen);
        if (queryLen > keyLen)
            throw new ArgumentOutOfRangeException(nameof(queryLen), queryLen, $"queryLen ({queryLen}) must be at most keyLen ({keyLen})");
        var shape = new Shape(batch, keyLen, headsQ, headsKv, headDim).Validate();
        long qLength = (long)batch * queryLen * headsQ * headDim;
        shape.Check(q, nameof(q), qLength);
        shape.Check(k, nameof(k), shape.KvLength);
        shape.Check(v, nameof(v), shape.KvLength);
        shape.Check(output, nameof(output), qLength);
        if (!lse.IsEmpty) shape.Check(lse, nameof(lse), (long)batch * headsQ * queryLen);
        if (qLength == 0) return;
        // A decoding step (one query over a short cache) is too little work for the thread pool: run it inline.
        // (The degree of parallelism never changes results.)
        if (maxDegreeOfParallelism == -1 && qLength * keyLen < SequentialWork) maxDegreeOfParallelism = 1;
        fixed (T* pq = q, pk = k, pv = v, po = output, pl = lse)
        {
            var work = new ForwardWork<T>(shape, queryLen, keyLen, pq, pk, pv, po, lse.IsEmpty ? null : pl, null);
            Run(batch * headsQ, maxDegreeOfParallelism, work.Run);
        }
    }

    /// <summary>
    /// Gradients of the forward: dq, dk, dv (all OVERWRITTEN) from dout, the inputs, and the forward's out and lse.
    /// With P[t,s] = exp(scale·q_t·k_s − lse_t), dP[t,s] = dout_t·v_s, Dt = dout_t·out_t, dS = P ∘ (dP − Dt):
    /// dq_t = scale · Σ_s dS[t,s] k_s; dk_s = scale · Σ_{h in group, t} dS[t,s] q_t; dv_s = Σ_{h in group, t} P[t,s] dout_t.
    /// </summary>
    /// <param name="maxDegreeOfParallelism">-1: the thread pool decides; 1: sequential. Never changes results.</param>
    public static void Backward<T>(ReadOnlySpan<T> dout, ReadOnlySpan<T> q, ReadOnlySpan<T> k, ReadOnlySpan<T> v,
        ReadOnlySpan<T> output, ReadOnlySpan<T> lse, Span<T> dq, Span<T> dk, Span<T> dv,
        int batch, int seqLen, int headsQ, int headsKv, int headDim, int maxDegreeOfParallelism = -1)
        where T : unmanaged, IFloatingPointIeee754<T> =>
        Backward(dout, q, k, v, output, lse, dq, dk, dv, default, batch, seqLen, headsQ, headsKv, headDim, maxDegreeOfParallelism);

    /// <summary>
    /// Validates the shape and the positions (empty = causal) and checks the lengths of the forward's tensors: q and output B·T·Hq·D,
    /// k and v B·T·Hkv·D, lse B·Hq·T (the backward reads the forward's inputs and outputs).
    /// </summary>
    private static Shape CheckForwardArgs<T>(ReadOnlySpan<T> q, ReadOnlySpan<T> k, ReadOnlySpan<T> v, ReadOnlySpan<T> output,
        ReadOnlySpan<T> lse, ReadOnlySpan<int> positions, int batch, int seqLen, int headsQ, int headsKv, int headDim)
    {
        var shape = new Shape(batch, seqLen, headsQ, headsKv, headDim).Validate();
        if (!positions.IsEmpty) ValidatePositions(positions, batch, seqLen);
        shape.Check(q, nameof(q), shape.QLength);
        shape.Check(k, nameof(k), shape.KvLength);
        shape.Check(v, nameof(v), shape.KvLength);
        shape.Check(output, nameof(output), shape.QLength);
        shape.Check(lse, nameof(lse), shape.LseLength);
        return shape;
    }

    /// <summary>
    /// The backward of the packed forward (positions as given to it; empty = causal): the sums over s and t run only
    /// over pairs in the same document.
    /// </summary>
    public static unsafe void Backward<T>(ReadOnlySpan<T> dout, ReadOnlySpan<T> q, ReadOnlySpan<T> k, ReadOnlySpan<T> v,
        ReadOnlySpan<T> output, ReadOnlySpan<T> lse, Span<T> dq, Span<T> dk, Span<T> dv, ReadOnlySpan<int> positions,
        int batch, int seqLen, int headsQ, int headsKv, int headDim, int maxDegreeOfParallelism = -1)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        var shape = CheckForwardArgs(q, k, v, output, lse, positions, batch, seqLen, headsQ, headsKv, headDim);
        shape.Check(dout, nameof(dout), shape.QLength);
        shape.Check(dq, nameof(dq), shape.QLength);
        shape.Check(dk, nameof(dk), shape.KvLength);
        shape.Check(dv, nameof(dv), shape.KvLength);
        if (shape.QLength == 0) return;
        fixed (T* pdo = dout, pq = q, pk = k, pv = v, po = output, pl = lse, pdq = dq, pdk = dk, pdv = dv)
        fixed (int* pp = positions)
        {
            var work = new BackwardWork<T>(shape, pdo, pq, pk, pv, po, pl, pdq, pdk, pdv, positions.IsEmpty ? null : pp);
            Run(batch * headsKv, maxDegreeOfParallelism, work.Run);
        }
    }

    /// <summary>
    /// Checks positions of packed sequences, I32 [batch, seqLen] row-major: each row starts a document
    /// (positions[b, 0] = 0) and every later token either starts the next document (0) or continues the current one
    /// (positions[b, t − 1] + 1). Throws an <see cref="ArgumentException"/> naming the first offending (b, t).
    /// </summary>
    public static void ValidatePositions(ReadOnlySpan<int> positions, int batch, int seqLen)
    {
        if (positions.Length != (long)batch * seqLen)
            throw new ArgumentException($"positions has {positions.Length} elements, expected {batch}·{seqLen}", nameof(positions));
        for (int b = 0; b < batch; b++)
            for (int t = 0; t < seqLen; t++)
            {
                int p = positions[b * seqLen + t];
                if (p != 0 && (t == 0 || p != positions[b * seqLen + t - 1] + 1))
                    throw new ArgumentException(
                        $"positions[{b}, {t}] = {p}: a position inside a document is 0 (a new document) or the previous position + 1" +
                        (t == 0 ? " (a row begins a document: 0)" : $" ({positions[b * seqLen + t - 1] + 1})"), nameof(positions));
            }
    }

    /// <summary>Below this many multiply-adds (queries · D · keys) <see cref="ForwardCached{T}"/> runs on the calling thread.</summary>
    private const long SequentialWork = 1L << 20;

    private static void Run(int items, int maxDegreeOfParallelism, Action<int> body)
    {
        if (maxDegreeOfParallelism == 1 || items == 1)
        {
            for (int i = 0; i < items; i++) body(i);
            return;
        }
        Parallel.For(0, items, new ParallelOptions { MaxDegreeOfParallelism = maxDegreeOfParallelism }, body);
    }

    private readonly record struct Shape(int B, int T, int Hq, int Hkv, int D)
    {
        public long QLength => (long)B * T * Hq * D;
        public long KvLength => (long)B * T * Hkv * D;
        public long LseLength => (long)B * Hq * T;
        public int Group => Hq / Hkv;

        public Shape Validate()
        {
            ArgumentOutOfRangeException.ThrowIfNegative(B, "batch");
            ArgumentOutOfRangeException.ThrowIfNegative(T, "seqLen");
            ArgumentOutOfRangeException.ThrowIfNegativeOrZero(Hq, "headsQ");
            ArgumentOutOfRangeException.ThrowIfNegativeOrZero(Hkv, "headsKv");
            ArgumentOutOfRangeException.ThrowIfNegativeOrZero(D, "headDim");
            if (Hq % Hkv != 0) throw new ArgumentException($"headsQ ({Hq}) is not a multiple of headsKv ({Hkv})", "headsKv");
            return this;
        }

        public void Check<TE>(ReadOnlySpan<TE> span, string name, long needed)
        {
            if (span.Length < needed) throw new ArgumentException($"{name} has {span.Length} elements, needs {needed}", name);
        }

        public void Check<TE>(Span<TE> span, string name, long needed) => Check((ReadOnlySpan<TE>)span, name, needed);
    }

    /// <summary>a·b over n elements (TensorPrimitives: vectorized, a fixed lane order for a given n, so deterministic).</summary>
    private static unsafe T Dot<T>(T* a, T* b, int n) where T : unmanaged, IFloatingPointIeee754<T> =>
        TensorPrimitives.Dot(new ReadOnlySpan<T>(a, n), new ReadOnlySpan<T>(b, n));

    /// <summary>y[i] = x[i] · alpha + y[i] over n elements (multiply, then add: not fused, as the scalar loop).</summary>
    private static unsafe void Axpy<T>(T alpha, T* x, T* y, int n) where T : unmanaged, IFloatingPointIeee754<T>
    {
        var ys = new Span<T>(y, n);
        TensorPrimitives.MultiplyAdd(new ReadOnlySpan<T>(x, n), alpha, ys, ys);
    }

    /// <summary>z[i] = x[i] · alpha + y[i] over n elements (z may be x).</summary>
    private static unsafe void Axpy<T>(T alpha, T* x, T* y, int n, T* z) where T : unmanaged, IFloatingPointIeee754<T> =>
        TensorPrimitives.MultiplyAdd(new ReadOnlySpan<T>(x, n), alpha, new ReadOnlySpan<T>(y, n), new Span<T>(z, n));

    /// <summary>
    /// One (b, h) pair: every query row t of that head (absolute position t + kvLen − qLen), online softmax over the
    /// keys up to that position (from its document's start with positions). lse and positions may be null.
    /// </summary>
    private sealed unsafe class ForwardWork<T>(Shape s, int qLen, int kvLen, T* q, T* k, T* v, T* output, T* lse, int* positions)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Run(int item)
        {
            int b = item / s.Hq, h = item % s.Hq, g = h / s.Group, D = s.D;
            int offset = kvLen - qLen;
            T scale = T.One / T.Sqrt(T.CreateChecked(D));
            long qRow = (long)s.Hq * D, kvRow = (long)s.Hkv * D;
            T* qHead = q + (long)b * qLen * qRow + (long)h * D;
            T* oHead = output + (long)b * qLen * qRow + (long)h * D;
            T* kHead = k + (long)b * kvLen * kvRow + (long)g * D;
            T* vHead = v + (long)b * kvLen * kvRow + (long)g * D;
            T* lseRow = lse is null ? null : lse + ((long)b * s.Hq + h) * qLen;
            var accArray = new T[D];
            fixed (T* acc = accArray)
            for (int t = 0; t < qLen; t++)
            {
                T* qt = qHead + t * qRow;
                T m = T.NegativeInfinity, l = T.Zero;
                Array.Clear(accArray);
                int first = positions is null ? 0 : t + offset - positions[(long)b * kvLen + t + offset];
                for (int j = first; j <= t + offset; j++)
                {
                    T x = scale * Dot(qt, kHead + j * kvRow, D);
                    T* vj = vHead + j * kvRow;
                    if (x > m)
                    {
                        // New running max: rescale what was accumulated so far (exp(-inf) = 0 on the first key).
                        T correction = T.Exp(m - x);
                        l = l * correction + T.One;
                        Axpy(correction, acc, vj, D, acc); // acc = acc · correction + vj
                        m = x;
                    }
                    else
                    {
                        T p = T.Exp(x - m);
                        l += p;
                        Axpy(p, vj, acc, D);
                    }
                }
                T* ot = oHead + t * qRow;
                for (int d = 0; d < D; d++) ot[d] = acc[d] / l;
                if (lseRow is not null) lseRow[t] = m + T.Log(l);
            }
        }
    }

    /// <summary>One (b, kv head) pair: its dk/dv rows, and dq of every query head of its group.</summary>
    private sealed unsafe class BackwardWork<T>(Shape s, T* dout, T* q, T* k, T* v, T* output, T* lse, T* dq, T* dk, T* dv, int* positions)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Run(int item)
        {
            int b = item / s.Hkv, g = item % s.Hkv, D = s.D;
            T scale = T.One / T.Sqrt(T.CreateChecked(D));
            long qRow = (long)s.Hq * D, kvRow = (long)s.Hkv * D;
            long kvBase = (long)b * s.T * kvRow + (long)g * D;
            T* kHead = k + kvBase, vHead = v + kvBase, dkHead = dk + kvBase, dvHead = dv + kvBase;
            for (int j = 0; j < s.T; j++)
            for (int d = 0; d < D; d++)
            {
                dkHead[j * kvRow + d] = T.Zero;
                dvHead[j * kvRow + d] = T.Zero;
            }
            var dqArray = new T[D];
            fixed (T* dqAcc = dqArray)
            for (int h = g * s.Group; h < (g + 1) * s.Group; h++)
            {
                long qBase = (long)b * s.T * qRow + (long)h * D;
                T* lseRow = lse + ((long)b * s.Hq + h) * s.T;
                for (int t = 0; t < s.T; t++)
                {
                    T* qt = q + qBase + t * qRow, dot = dout + qBase + t * qRow, ot = output + qBase + t * qRow;
                    T rowD = Dot(dot, ot, D);
                    T lseT = lseRow[t];
                    Array.Clear(dqArray);
                    int first = positions is null ? 0 : t - positions[(long)b * s.T + t];
                    for (int j = first; j <= t; j++)
                    {
                        T* kj = kHead + j * kvRow, vj = vHead + j * kvRow, dkj = dkHead + j * kvRow, dvj = dvHead + j * kvRow;
                        T p = T.Exp(scale * Dot(qt, kj, D) - lseT);
                        T dS = p * (Dot(dot, vj, D) - rowD);
                        T dSScaled = scale * dS;
                        Axpy(dS, kj, dqAcc, D);
                        Axpy(dSScaled, qt, dkj, D);
                        Axpy(p, dot, dvj, D);
                    }
                    T* dqt = dq + qBase + t * qRow;
                    for (int d = 0; d < D; d++) dqt[d] = scale * dqAcc[d];
                }
            }
        }
    }
}
