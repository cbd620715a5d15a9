using NativePeft.Runtime;
using System.Numerics;
using System.Runtime.InteropServices;

namespace NativePeft.Ops.Reference;

/// <summary>
/// Cross-entropy fused with the LM head, chunked over the vocabulary, forward and backward: the full [N, V] logits
/// never exist; logits are computed for a block of at most <see cref="RowBlock"/> rows and <c>chunk</c> vocabulary
/// rows at a time (one [min(N, RowBlock), min(chunk, V)] buffer per call), with an online log-sum-exp per row.
/// <para>
/// Layouts (row-major): hidden[N, C] (the final-norm output), weight[V, C] (lm_head, [out, in]), labels[N] (already
/// shifted by the caller; <see cref="IgnoreIndex"/> = -100 for positions without a loss), lse[N], dhidden[N, C],
/// dweight[V, C]. Logits z[n, v] = hidden[n, :] · weight[v, :]. Loss = mean over counted (non-ignored) tokens of
/// lse[n] − z[n, labels[n]], as torch's F.cross_entropy(ignore_index=-100, reduction="mean").
/// </para>
/// <para>
/// Arithmetic: the chunk GEMMs use <see cref="HostBlas.Sgemm"/> when T is float and a CBLAS library is present,
/// a plain dot-product loop otherwise (always for double); the per-row log-sum-exp and softmax are in T; the loss
/// is summed over rows in double in row order and divided once. Results depend on the chunk size only through
/// rounding. Parallel over rows (and over vocabulary rows for dweight) only in ways that leave every result
/// bit-identical for any <c>maxDegreeOfParallelism</c>. Caveat for the float/Sgemm path: OpenBLAS's own thread
/// count (OPENBLAS_NUM_THREADS) changes its rounding (measured: loss 10.429342174942875 with 1 thread vs
/// 10.429342166685954 with 2 at N=512, C=512, V=32000), so float results are reproducible for a fixed BLAS library and
/// BLAS thread count, not across them; the double path has no such dependence.
/// </para>
/// </summary>
public static class CrossEntropyRef
{
    /// <summary>Label value of a position that has no loss (torch's default ignore_index).</summary>
    public const int IgnoreIndex = -100;

    /// <summary>Rows of hidden processed together (the logits buffer is RowBlock × chunk elements).</summary>
    public const int RowBlock = 256;

    /// <summary>
    /// Mean cross-entropy of the logits hidden · weightᵀ against labels, computed chunk by chunk of vocabulary rows.
    /// Writes lse[n] (log-sum-exp of row n's logits, for every row, ignored or not) when lse is not empty.
    /// Returns the mean loss (0 when every label is ignored) and the number of counted tokens.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">a label outside [0, V) that is not -100.</exception>
    public static unsafe (double Loss, int Count) Forward<T>(ReadOnlySpan<T> hidden, ReadOnlySpan<T> weight, ReadOnlySpan<int> labels,
        Span<T> lse, int rows, int hiddenSize, int vocabSize, int chunk, int maxDegreeOfParallelism = -1)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        int count = Validate(hidden, weight, labels, rows, hiddenSize, vocabSize, chunk);
        if (!lse.IsEmpty && lse.Length < rows) throw new ArgumentException($"lse has {lse.Length} elements, needs {rows} (or none)", nameof(lse));
        if (rows == 0) return (0, 0);
        int C = hiddenSize, blockRows = Math.Min(rows, RowBlock), chunkCols = Math.Min(chunk, vocabSize);
        var logits = new T[(long)blockRows * chunkCols];
        var runMax = new T[blockRows];
        var runSum = new T[blockRows];
        var labelLogit = new T[blockRows];
        double total = 0;
        fixed (T* ph = hidden, pw = weight, pz = logits, pMax = runMax, pSum = runSum, pLabel = labelLogit)
        fixed (int* pLabels = labels)
        {
            T* h = ph, w = pw, z = pz, mx = pMax, sm = pSum, zl = pLabel;
            int* lab = pLabels;
            for (int r0 = 0; r0 < rows; r0 += RowBlock)
            {
                int r = Math.Min(RowBlock, rows - r0);
                for (int i = 0; i < r; i++) { mx[i] = T.NegativeInfinity; sm[i] = T.Zero; zl[i] = T.Zero; }
                for (int v0 = 0; v0 < vocabSize; v0 += chunk)
                {
                    int c = Math.Min(chunk, vocabSize - v0);
                    Logits(h + (long)r0 * C, w + (long)v0 * C, z, r, c, C, maxDegreeOfParallelism);
                    int firstVocab = v0, firstRow = r0;
                    For(r, maxDegreeOfParallelism, i =>
                    {
                        T* row = z + (long)i * c;
                        T chunkMax = T.NegativeInfinity;
                        for (int j = 0; j < c; j++) chunkMax = T.Max(chunkMax, row[j]);
                        if (chunkMax > mx[i])
                        {
                            sm[i] *= T.Exp(mx[i] - chunkMax);
                            mx[i] = chunkMax;
                        }
                        T m = mx[i], s = sm[i];
                        for (int j = 0; j < c; j++) s += T.Exp(row[j] - m);
                        sm[i] = s;
                        int label = lab[firstRow + i] - firstVocab;
                        if (label >= 0 && label < c) zl[i] = row[label];
                    });
                }
                for (int i = 0; i < r; i++)
                {
                    T rowLse = mx[i] + T.Log(sm[i]);
                    if (!lse.IsEmpty) lse[r0 + i] = rowLse;
                    if (labels[r0 + i] != IgnoreIndex) total += double.CreateChecked(rowLse - zl[i]);
                }
            }
        }
        return count == 0 ? (0, 0) : (total / count, count);
    }

    /// <summary>
    /// Gradients of <c>dloss · Forward(...).Loss</c>: dhidden[N, C] (OVERWRITTEN) = Σ_v g[n, v] · weight[v, :] and,
    /// when dweight is not empty, dweight[V, C] += Σ_n g[n, v] · hidden[n, :] (ACCUMULATES; full fine-tuning of the
    /// LM head), with g[n, v] = dloss / count · (softmax(z[n])[v] − [v == labels[n]]) and g = 0 on ignored rows.
    /// lse is the Forward's lse (N elements). A second pass over the vocabulary chunks recomputes the logits.
    /// All labels ignored: dhidden = 0 and dweight unchanged.
    /// </summary>
    public static unsafe void Backward<T>(ReadOnlySpan<T> hidden, ReadOnlySpan<T> weight, ReadOnlySpan<int> labels,
        ReadOnlySpan<T> lse, T dloss, Span<T> dhidden, Span<T> dweight, int rows, int hiddenSize, int vocabSize, int chunk,
        int maxDegreeOfParallelism = -1)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        int count = Validate(hidden, weight, labels, rows, hiddenSize, vocabSize, chunk);
        int C = hiddenSize;
        if (lse.Length < rows) throw new ArgumentException($"lse has {lse.Length} elements, needs {rows}", nameof(lse));
        if (dhidden.Length < (long)rows * C) throw new ArgumentException($"dhidden has {dhidden.Length} elements, needs {(long)rows * C}", nameof(dhidden));
        bool wantWeight = !dweight.IsEmpty;
        if (wantWeight && dweight.Length < (long)vocabSize * C)
            throw new ArgumentException($"dweight has {dweight.Length} elements, needs {(long)vocabSize * C} (or none)", nameof(dweight));
        dhidden[..(rows * C)].Clear();
        if (count == 0) return;
        T scale = dloss / T.CreateChecked(count);
        int blockRows = Math.Min(rows, RowBlock), chunkCols = Math.Min(chunk, vocabSize);
        var logits = new T[(long)blockRows * chunkCols];
        fixed (T* ph = hidden, pw = weight, pz = logits, pl = lse, pdh = dhidden, pdw = dweight)
        fixed (int* pLabels = labels)
        {
            T* h = ph, w = pw, g = pz, lseRows = pl;
            int* lab = pLabels;
            for (int r0 = 0; r0 < rows; r0 += RowBlock)
            {
                int r = Math.Min(RowBlock, rows - r0);
                for (int v0 = 0; v0 < vocabSize; v0 += chunk)
                {
                    int c = Math.Min(chunk, vocabSize - v0);
                    Logits(h + (long)r0 * C, w + (long)v0 * C, g, r, c, C, maxDegreeOfParallelism);
                    int firstVocab = v0, firstRow = r0;
                    For(r, maxDegreeOfParallelism, i =>
                    {
                        T* row = g + (long)i * c;
                        int label = lab[firstRow + i];
                        if (label == IgnoreIndex)
                        {
                            for (int j = 0; j < c; j++) row[j] = T.Zero;
                            return;
                        }
                        T rowLse = lseRows[firstRow + i];
                        for (int j = 0; j < c; j++) row[j] = scale * T.Exp(row[j] - rowLse);
                        label -= firstVocab;
                        if (label >= 0 && label < c) row[label] -= scale;
                    });
                    AddGradInput(g, w + (long)v0 * C, pdh + (long)r0 * C, r, c, C, maxDegreeOfParallelism);
                    if (wantWeight) AddGradWeight(g, h + (long)r0 * C, pdw + (long)v0 * C, r, c, C, maxDegreeOfParallelism);
                }
            }
        }
    }

    /// <summary>Number of counted tokens (labels that are not -100) among the first rows labels.</summary>
    public static int CountTokens(ReadOnlySpan<int> labels)
    {
        int count = 0;
        foreach (int label in labels) if (label != IgnoreIndex) count++;
        return count;
    }

    private static int Validate<T>(ReadOnlySpan<T> hidden, ReadOnlySpan<T> weight, ReadOnlySpan<int> labels,
        int rows, int hiddenSize, int vocabSize, int chunk)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(hiddenSize);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(vocabSize);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(chunk);
        if (hidden.Length < (long)rows * hiddenSize) throw new ArgumentException($"hidden has {hidden.Length} elements, needs {(long)rows * hiddenSize}", nameof(hidden));
        if (weight.Length < (long)vocabSize * hiddenSize) throw new ArgumentException($"weight has {weight.Length} elements, needs {(long)vocabSize * hiddenSize}", nameof(weight));
        if (labels.Length < rows) throw new ArgumentException($"labels has {labels.Length} elements, needs {rows}", nameof(labels));
        int count = 0;
        for (int n = 0; n < rows; n++)
        {
            int label = labels[n];
            if (label == IgnoreIndex) continue;
            if ((uint)label >= (uint)vocabSize)
                throw new ArgumentOutOfRangeException(nameof(labels), label, $"label at position {n} is {label}: not in [0, {vocabSize}) and not {IgnoreIndex}");
            count++;
        }
        return count;
    }

    private static void For(int n, int maxDegreeOfParallelism, Action<int> body)
    {
        if (maxDegreeOfParallelism == 1 || n < 16)
        {
            for (int i = 0; i < n; i++) body(i);
            return;
        }
        Parallel.For(0, n, new ParallelOptions { MaxDegreeOfParallelism = maxDegreeOfParallelism }, body);
    }

    private static bool UseSgemm<T>() => typeof(T) == typeof(float) && HostBlas.IsAvailable;

    private static unsafe Span<float> Floats<T>(T* p, long length) where T : unmanaged =>
        MemoryMarshal.Cast<T, float>(new Span<T>(p, checked((int)length)));

    /// <summary>z[r, c] = h[r, C] · w[c, C]ᵀ.</summary>
    private static unsafe void Logits<T>(T* h, T* w, T* z, int r, int c, int C, int maxDegreeOfParallelism)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        if (UseSgemm<T>())
        {
            HostBlas.Sgemm(false, true, r, c, C, 1f, Floats(h, (long)r * C), Floats(w, (long)c * C), 0f, Floats(z, (long)r * c));
            return;
        }
        For(r, maxDegreeOfParallelism, i =>
        {
            T* hi = h + (long)i * C;
            T* zi = z + (long)i * c;
            for (int j = 0; j < c; j++)
            {
                T* wj = w + (long)j * C;
                T sum = T.Zero;
                for (int d = 0; d < C; d++) sum += hi[d] * wj[d];
                zi[j] = sum;
            }
        });
    }

    /// <summary>dh[r, C] += g[r, c] · w[c, C].</summary>
    private static unsafe void AddGradInput<T>(T* g, T* w, T* dh, int r, int c, int C, int maxDegreeOfParallelism)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        if (UseSgemm<T>())
        {
            HostBlas.Sgemm(false, false, r, C, c, 1f, Floats(g, (long)r * c), Floats(w, (long)c * C), 1f, Floats(dh, (long)r * C));
            return;
        }
        For(r, maxDegreeOfParallelism, i =>
        {
            T* gi = g + (long)i * c;
            T* dhi = dh + (long)i * C;
            for (int j = 0; j < c; j++)
            {
                T gij = gi[j];
                T* wj = w + (long)j * C;
                for (int d = 0; d < C; d++) dhi[d] += gij * wj[d];
            }
        });
    }

    /// <summary>dw[c, C] += g[r, c]ᵀ · h[r, C].</summary>
    private static unsafe void AddGradWeight<T>(T* g, T* h, T* dw, int r, int c, int C, int maxDegreeOfParallelism)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        if (UseSgemm<T>())
        {
            HostBlas.Sgemm(true, false, c, C, r, 1f, Floats(g, (long)r * c), Floats(h, (long)r * C), 1f, Floats(dw, (long)c * C));
            return;
        }
        For(c, maxDegreeOfParallelism, j =>
        {
            T* dwj = dw + (long)j * C;
            for (int i = 0; i < r; i++)
            {
                T gij = g[(long)i * c + j];
                T* hi = h + (long)i * C;
                for (int d = 0; d < C; d++) dwj[d] += gij * hi[d];
            }
        });
    }
}
