using NativePeft.Numerics;
using NativePeft.Runtime;

namespace NativePeft.Ops;

/// <summary>
/// <see cref="IOps"/> on an <see cref="IGpu"/>: the kernels of kernels/*.cu through their launchers (GpuQuantOps,
/// GpuTransformerOps, GpuAttentionOps, GpuLossOps, GpuElementwiseOps), the same code on CudaGpu and EmulatedGpu.
/// GEMMs: cuBLAS (cublasGemmEx, fp32 accumulation) on CUDA; the host BLAS on the emulator, whose device memory
/// is host memory. Compute dtypes: F32 and BF16 (bf16 inputs, fp32 accumulation; on the emulator the host BLAS on
/// exactly widened copies, C rounded once); rstd, lse and the RoPE tables are F32.
/// Workspace the ops need (cross-entropy logits chunks, attention's row sums) comes from <see cref="Memory"/> and
/// is returned before the op does.
/// </summary>
public sealed unsafe class GpuOps : IOps
{
    private readonly IGpu _gpu;
    private readonly bool _ownsGpu;
    private readonly TensorMemory _memory;
    private readonly GpuQuantOps _quant;
    private readonly GpuTransformerOps _tx;
    private readonly GpuAttentionOps _attention;
    private readonly GpuLossOps _loss;
    private readonly GpuElementwiseOps _elementwise;
    private readonly GpuLoraOps _lora;

    /// <param name="memory">Device memory of <paramref name="gpu"/> for the tensors (owned: disposed with the ops), e.g. a
    /// <see cref="DevicePool"/>; null: <see cref="GpuTensorMemory"/>.</param>
    /// <param name="attentionTensorCores">bf16 attention at head dim 64/128 on the tensor-core kernels (the default);
    /// false: the fp32-arithmetic kernels for every shape (see <see cref="GpuAttentionOps(IGpu, bool)"/>).</param>
    public GpuOps(IGpu gpu, bool ownsGpu = false, TensorMemory? memory = null, bool attentionTensorCores = true)
    {
        _gpu = gpu ?? throw new ArgumentNullException(nameof(gpu));
        _ownsGpu = ownsGpu;
        _memory = memory ?? new GpuTensorMemory(gpu);
        _quant = new GpuQuantOps(gpu);
        _tx = new GpuTransformerOps(gpu);
        _attention = new GpuAttentionOps(gpu, attentionTensorCores);
        _loss = new GpuLossOps(gpu);
        _elementwise = new GpuElementwiseOps(gpu);
        _lora = new GpuLoraOps(gpu);
    }

    public IGpu Gpu => _gpu;
    public string Name => _gpu.Properties.Name;
    public TensorMemory Memory => _memory;
    public IGpu? Device => _gpu;

    public double SumOfSquares(IReadOnlyList<Tensor> tensors)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        foreach (var g in tensors) RequireF32(g, nameof(tensors));
        var scratch = _memory.Allocate(DType.F64, GpuElementwiseOps.MaxSumSquaresBlocks + 1);
        try
        {
            return _elementwise.SumSquares(tensors.Select(g => (g.Data, g.Count)),
                scratch.Data, scratch.Data.Offset(GpuElementwiseOps.MaxSumSquaresBlocks * sizeof(double)));
        }
        finally { _memory.Free(scratch); }
    }

    private static DType Compute(string op, params Tensor?[] tensors)
    {
        DType? d = null;
        foreach (var t in tensors)
        {
            if (t is null) continue;
            if (t.DType is not (DType.F32 or DType.BF16))
                throw new ArgumentException($"{op}: {t} — the GPU ops compute in F32 or BF16");
            if (d is { } e && e != t.DType)
                throw new ArgumentException($"{op}: mixed dtypes {e} and {t.DType}");
            d = t.DType;
        }
        return d ?? DType.F32;
    }

    private static void RequireF32(Tensor t, string name)
    {
        if (t.DType != DType.F32) throw new ArgumentException($"{name}: must be F32 on the GPU, got {t}", name);
    }

    private static void Require(Tensor t, string name, DType dtype)
    {
        if (t.DType != dtype) throw new ArgumentException($"{name}: must be {dtype}, got {t}", name);
    }

    // --- data movement ---------------------------------------------------------------------------

    public void Upload<T>(ReadOnlySpan<T> source, Tensor destination) where T : unmanaged
    {
        CheckElement<T>(destination);
        destination.ExpectCount(nameof(destination), source.Length);
        _gpu.CopyToDevice(source, destination.Data);
    }

    public void Download<T>(Tensor source, Span<T> destination) where T : unmanaged
    {
        CheckElement<T>(source);
        if (destination.Length < source.Count)
            throw new ArgumentException($"destination holds {destination.Length} elements, {source} has {source.Count}", nameof(destination));
        _gpu.Synchronize();
        _gpu.CopyToHost(source.Data, destination[..checked((int)source.Count)]);
    }

    private static void CheckElement<T>(Tensor t) where T : unmanaged
    {
        if (DTypes.Of<T>() != t.DType)
            throw new ArgumentException($"{typeof(T).Name} does not match the tensor's dtype {t.DType}");
    }

    public void Fill(Tensor x, double value)
    {
        if (x.DType is DType.F32 or DType.BF16) { _elementwise.Fill(x.DType, x.Data, x.Count, (float)value); return; }
        if (x.DType == DType.I32 && value == 0) { _gpu.Memset(x.Data, 0, x.Bytes); return; }
        throw new ArgumentException($"Fill: dtype {x.DType} not supported on the GPU", nameof(x));
    }

    public void Copy(Tensor source, Tensor destination)
    {
        destination.ExpectCount(nameof(destination), source.Count);
        if (source.DType == destination.DType) _gpu.CopyDeviceToDevice(source.Data, destination.Data, source.Bytes);
        else if (source.DType == DType.F32 && destination.DType == DType.BF16) _elementwise.CastF32ToBf16(source.Data, destination.Data, source.Count);
        else if (source.DType == DType.BF16 && destination.DType == DType.F32) _elementwise.CastBf16ToF32(source.Data, destination.Data, source.Count);
        else throw new ArgumentException($"Copy: {source.DType} → {destination.DType} not supported on the GPU");
    }

    // --- elementwise -----------------------------------------------------------------------------

    public void Add(Tensor a, Tensor b, Tensor c)
    {
        b.ExpectCount(nameof(b), a.Count); c.ExpectCount(nameof(c), a.Count);
        _elementwise.Add(Compute("Add", a, b, c), a.Data, b.Data, c.Data, a.Count);
    }

    public void Axpy(double alpha, Tensor x, Tensor y)
    {
        y.ExpectCount(nameof(y), x.Count);
        RequireF32(x, nameof(x)); RequireF32(y, nameof(y));
        _elementwise.Axpy((float)alpha, x.Data, y.Data, x.Count);
    }

    public void Scale(Tensor x, double alpha) => _elementwise.Scale(Compute("Scale", x), x.Data, x.Data, x.Count, (float)alpha);

    public void Dropout(Tensor x, Tensor mask, double p, ulong seed, Tensor y)
    {
        Require(mask, nameof(mask), DType.U8);
        mask.ExpectCount(nameof(mask), x.Count); y.ExpectCount(nameof(y), x.Count);
        _elementwise.DropoutMask(mask.Data, mask.Count, seed, 0, p);
        _elementwise.ApplyMaskScale(Compute("Dropout", x, y), x.Data, mask.Data, y.Data, x.Count, p);
    }

    public void DropoutBackward(Tensor dy, Tensor mask, double p, Tensor dx)
    {
        Require(mask, nameof(mask), DType.U8);
        mask.ExpectCount(nameof(mask), dy.Count); dx.ExpectCount(nameof(dx), dy.Count);
        _elementwise.ApplyMaskScale(Compute("DropoutBackward", dy, dx), dy.Data, mask.Data, dx.Data, dy.Count, p);
    }

    // --- GEMM ------------------------------------------------------------------------------------

    public void Matmul(Tensor a, bool transA, Tensor b, bool transB, Tensor c, double alpha = 1, double beta = 0)
    {
        int m = transA ? a.Columns : a.Rows, k = transA ? a.Rows : a.Columns;
        int kb = transB ? b.Columns : b.Rows, n = transB ? b.Rows : b.Columns;
        if (kb != k) throw new ArgumentException($"Matmul: inner dimensions differ: op(A) is [{m}, {k}], op(B) is [{kb}, {n}]");
        if (c.Rows != m || c.Columns != n) throw new ArgumentException($"Matmul: C is [{c.Rows}, {c.Columns}], expected [{m}, {n}]");
        // A and B share a dtype; C has it too, or is F32 with BF16 inputs (mixed precision: bf16 in, fp32 accumulate
        // and out, e.g. an fp32 weight gradient from bf16 activations).
        var dtype = Compute("Matmul", a, b);
        if (c.DType != dtype && !(dtype == DType.BF16 && c.DType == DType.F32))
            throw new ArgumentException($"Matmul: C is {c.DType} with {dtype} inputs (C must be {dtype}{(dtype == DType.BF16 ? " or F32" : "")})");
        if (m == 0 || n == 0) return;
        _gpu.Gemm(transA, transB, m, n, k, (float)alpha, a.Data, b.Data, (float)beta, c.Data, dtype, c.DType);
    }

    // --- LoRA ------------------------------------------------------------------------------------

    /// <summary>
    /// BF16 with in a multiple of 8 and 16-byte aligned x and A: the fused tensor-core kernel (<see cref="GpuLoraOps.Down"/>),
    /// adapters packed into launches of up to 3 (Σ padded ranks ≤ 128) in order; a split-feature workspace (fp32, a few MB at
    /// most) from <see cref="Memory"/> when the rows alone do not fill the device. Otherwise (F32, other shapes, an
    /// adapter of rank &gt; 128) the unfused ops, as LoraLinear runs them.
    /// </summary>
    public void LoraDown(Tensor x, IReadOnlyList<LoraDownArgs> adapters)
    {
        LoraChecks.Down(x, adapters);
        var dtype = Compute("LoraDown", [x, .. adapters.Select(d => d.A), .. adapters.Select(d => d.Xa)]);
        if (x.Rows == 0) return;
        if (dtype != DType.BF16 || !GpuLoraOps.Supports(x.Columns, [x.Data, .. adapters.Select(d => d.A.Data)]))
        {
            LoraUnfused.Down(this, x, adapters);
            return;
        }
        var runs = GpuLoraOps.Launches(adapters.Select(d => d.A.Rows).ToList(), GpuLoraOps.DownMaxPaddedRank);
        long wsBytes = runs.Where(r => r.Count > 0)
            .Select(r => GpuLoraOps.DownWorkspaceBytes(x.Rows, x.Columns, Enumerable.Range(r.Start, r.Count).Sum(g => GpuLoraOps.PaddedRank(adapters[g].A.Rows))))
            .DefaultIfEmpty(0).Max();
        Tensor? workspace = wsBytes == 0 ? null : _memory.Allocate(DType.F32, checked((int)(wsBytes / sizeof(float))));
        try
        {
            foreach (var (start, count) in runs)
            {
                if (count == 0) { LoraUnfused.Down(this, x, [adapters[start]]); continue; }
                var slots = new LoraKernelAdapter[count];
                for (int i = 0; i < count; i++)
                {
                    var d = adapters[start + i];
                    slots[i] = new LoraKernelAdapter(d.A.Data, d.Xa.Data, DevicePtr.Null, d.A.Rows, d.DropoutP, d.Seed);
                }
                _lora.Down(x.Data, x.Rows, x.Columns, slots, workspace?.Data ?? DevicePtr.Null);
            }
        }
        finally
        {
            if (workspace is not null) _memory.Free(workspace);
        }
    }

    /// <summary>
    /// DA must be F32 (the fp32 master's gradient). BF16 with in a multiple of 8 and 16-byte aligned x, dx and A: the
    /// fused kernels (<see cref="GpuLoraOps.BackwardInput"/>; launches of up to 3 adapters, Σ padded ranks ≤ 64, each
    /// reading and writing dx once), with an fp32 workspace from <see cref="Memory"/>. Otherwise the unfused ops.
    /// </summary>
    public void LoraBackwardInput(Tensor x, IReadOnlyList<LoraBackwardArgs> adapters, Tensor dx)
    {
        LoraChecks.Backward(x, adapters, dx);
        var dtype = Compute("LoraBackwardInput", [x, dx, .. adapters.Select(d => d.A), .. adapters.Select(d => d.DXa)]);
        for (int g = 0; g < adapters.Count; g++)
            if (adapters[g].DA.DType != DType.F32)
                throw new ArgumentException($"adapters[{g}].DA: must be F32 on the GPU (the fp32 gradient of A), got {adapters[g].DA}", nameof(adapters));
        if (x.Rows == 0) return;
        if (dtype != DType.BF16 || !GpuLoraOps.Supports(x.Columns, [x.Data, dx.Data, .. adapters.Select(d => d.A.Data)]))
        {
            LoraUnfused.Backward(this, x, adapters, dx);
            return;
        }
        var runs = GpuLoraOps.Launches(adapters.Select(d => d.A.Rows).ToList(), GpuLoraOps.BackwardMaxPaddedRank);
        int widest = runs.Where(r => r.Count > 0)
            .Select(r => Enumerable.Range(r.Start, r.Count).Sum(g => GpuLoraOps.PaddedRank(adapters[g].A.Rows))).DefaultIfEmpty(0).Max();
        Tensor? workspace = widest == 0 ? null
            : _memory.Allocate(DType.F32, checked((int)(GpuLoraOps.BackwardWorkspaceBytes(x.Rows, x.Columns, widest) / sizeof(float))));
        try
        {
            foreach (var (start, count) in runs)
            {
                if (count == 0) { LoraUnfused.Backward(this, x, [adapters[start]], dx); continue; }
                var slots = new LoraKernelAdapter[count];
                for (int i = 0; i < count; i++)
                {
                    var d = adapters[start + i];
                    slots[i] = new LoraKernelAdapter(d.A.Data, d.DXa.Data, d.DA.Data, d.A.Rows, d.DropoutP, d.Seed);
                }
                _lora.BackwardInput(x.Data, dx.Data, x.Rows, x.Columns, slots, workspace!.Data);
            }
        }
        finally
        {
            if (workspace is not null) _memory.Free(workspace);
        }
    }

    // --- 4-bit -----------------------------------------------------------------------------------

    public void Dequantize4bit(QuantizedWeight weight, int firstRow, Tensor output)
    {
        long first = (long)firstRow * weight.Columns;
        if (output.Columns != weight.Columns || firstRow < 0 || firstRow + output.Rows > weight.Rows)
            throw new ArgumentException($"Dequantize4bit: rows [{firstRow}, {firstRow + output.Rows}) x {output.Columns} outside the [{weight.Rows}, {weight.Columns}] weight");
        if (first % weight.Blocksize != 0)
            throw new ArgumentException($"Dequantize4bit: row {firstRow} does not start a block of {weight.Blocksize}");
        if (weight.DoubleQuant is { } dq)
            _quant.Dequantize4bitDoubleQuant(weight.QuantType, Compute("Dequantize4bit", output), weight.Packed.Data.Offset(first / 2),
                dq.Absmax.Data, dq.NestedQuantMap.Data, dq.NestedAbsmax.Data, dq.NestedOffset.Data, first / weight.Blocksize,
                output.Count, weight.Blocksize, output.Data);
        else
            _quant.Dequantize4bit(weight.QuantType, Compute("Dequantize4bit", output), weight.Packed.Data.Offset(first / 2),
                (weight.Absmax ?? throw new ArgumentException("Dequantize4bit: the weight has neither absmax nor a double-quantized state", nameof(weight)))
                .Data.Offset(first / weight.Blocksize * sizeof(float)), output.Count, weight.Blocksize, output.Data);
    }

    public bool TryGemv4bit(Tensor x, QuantizedWeight weight, Tensor y)
    {
        if (x.Rows != 1 || x.DType is not (DType.F32 or DType.BF16) || y.DType != x.DType) return false;
        x.Expect(nameof(x), 1, weight.Columns);
        y.Expect(nameof(y), 1, weight.Rows);
        if (weight.DoubleQuant is { } dq)
            _quant.Linear4bitGemv(weight.QuantType, x.DType, x.Data, weight.Packed.Data, DevicePtr.Null, dq.Absmax.Data, dq.NestedQuantMap.Data,
                dq.NestedAbsmax.Data, dq.NestedOffset.Data, y.Data, weight.Rows, weight.Columns, weight.Blocksize);
        else
            _quant.Linear4bitGemv(weight.QuantType, x.DType, x.Data, weight.Packed.Data,
                (weight.Absmax ?? throw new ArgumentException("TryGemv4bit: the weight has neither absmax nor a double-quantized state", nameof(weight))).Data,
                DevicePtr.Null, DevicePtr.Null, DevicePtr.Null, DevicePtr.Null, y.Data, weight.Rows, weight.Columns, weight.Blocksize);
        return true;
    }

    // --- transformer ops -------------------------------------------------------------------------

    public void RmsNormForward(Tensor x, Tensor weight, Tensor y, Tensor rstd, double eps)
    {
        RequireF32(rstd, nameof(rstd));
        _tx.RmsNormForward(Compute("RmsNormForward", x, weight, y), x.Data, weight.Data, y.Data, rstd.Data, x.Rows, x.Columns, (float)eps);
    }

    public void RmsNormBackward(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor dx, Tensor? dweight, bool accumulate = false)
    {
        RequireF32(rstd, nameof(rstd));
        if (dweight is not null) RequireF32(dweight, nameof(dweight));
        _tx.RmsNormBackward(Compute("RmsNormBackward", dy, x, weight, dx), x.Data, weight.Data, dy.Data, rstd.Data, dx.Data,
            dweight?.Data ?? DevicePtr.Null, x.Rows, x.Columns, accumulate);
    }

    public void RopeForward(Tensor x, Tensor positions, Tensor cos, Tensor sin, int heads, int headDim)
    {
        Require(positions, nameof(positions), DType.I32); RequireF32(cos, nameof(cos)); RequireF32(sin, nameof(sin));
        _tx.RopeForward(Compute("RopeForward", x), x.Data, cos.Data, sin.Data, positions.Data, checked((int)positions.Count), heads, headDim, cos.Rows);
    }

    public void RopeBackward(Tensor dx, Tensor positions, Tensor cos, Tensor sin, int heads, int headDim)
    {
        Require(positions, nameof(positions), DType.I32); RequireF32(cos, nameof(cos)); RequireF32(sin, nameof(sin));
        _tx.RopeBackward(Compute("RopeBackward", dx), dx.Data, cos.Data, sin.Data, positions.Data, checked((int)positions.Count), heads, headDim, cos.Rows);
    }

    public void AttentionForward(Tensor q, Tensor k, Tensor v, Tensor output, Tensor lse, int batch, int seqLen, int headsQ, int headsKv, int headDim,
        Tensor? positions = null)
    {
        RequireF32(lse, nameof(lse));
        _attention.Forward(Compute("AttentionForward", q, k, v, output), q.Data, k.Data, v.Data, output.Data, lse.Data,
            batch, seqLen, headsQ, headsKv, headDim, PositionsPtr(positions, batch, seqLen));
    }

    /// <summary>The device pointer of packed-sequence positions (I32 [B·T]; not checked element by element), null for none.</summary>
    private static DevicePtr PositionsPtr(Tensor? positions, int batch, int seqLen)
    {
        if (positions is null) return DevicePtr.Null;
        Require(positions, nameof(positions), DType.I32);
        positions.ExpectCount(nameof(positions), (long)batch * seqLen);
        return positions.Data;
    }

    public void AttentionForwardCached(Tensor q, Tensor k, Tensor v, Tensor output, Tensor? lse, int batch, int queryLen, int keyLen,
        int headsQ, int headsKv, int headDim, Tensor? workspace = null)
    {
        if (lse is not null) RequireF32(lse, nameof(lse));
        _attention.ForwardCached(Compute("AttentionForwardCached", q, k, v, output), q.Data, k.Data, v.Data, output.Data,
            lse?.Data ?? DevicePtr.Null, batch, queryLen, keyLen, headsQ, headsKv, headDim,
            workspace?.Data ?? DevicePtr.Null, workspace?.Bytes ?? 0);
    }

    public void AttentionBackward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor output, Tensor lse, Tensor dq, Tensor dk, Tensor dv,
        int batch, int seqLen, int headsQ, int headsKv, int headDim, Tensor? positions = null)
    {
        RequireF32(lse, nameof(lse));
        var pos = PositionsPtr(positions, batch, seqLen);
        var dtype = Compute("AttentionBackward", dout, q, k, v, output, dq, dk, dv);
        var workspace = _memory.Allocate(DType.F32, checked((int)(GpuAttentionOps.BackwardWorkspaceBytes(batch, seqLen, headsQ) / sizeof(float))));
        try
        {
            _attention.Backward(dtype, dout.Data, q.Data, k.Data, v.Data, output.Data, lse.Data, dq.Data, dk.Data, dv.Data,
                workspace.Data, batch, seqLen, headsQ, headsKv, headDim, pos);
            _gpu.Synchronize();
        }
        finally { _memory.Free(workspace); }
    }

    public void SwiGluForward(Tensor gate, Tensor up, Tensor h) =>
        _tx.SwiGluForward(Compute("SwiGluForward", gate, up, h), gate.Data, up.Data, h.Data, gate.Count);

    public void SwiGluBackward(Tensor dh, Tensor gate, Tensor up, Tensor dgate, Tensor dup) =>
        _tx.SwiGluBackward(Compute("SwiGluBackward", dh, gate, up, dgate, dup), gate.Data, up.Data, dh.Data, dgate.Data, dup.Data, gate.Count);

    public void EmbeddingForward(Tensor ids, Tensor table, Tensor output)
    {
        Require(ids, nameof(ids), DType.I32);
        _tx.EmbeddingForward(Compute("EmbeddingForward", table, output), ids.Data, table.Data, output.Data, checked((int)ids.Count), table.Columns, table.Rows);
    }

    public void EmbeddingBackward(Tensor ids, Tensor dout, Tensor dtable)
    {
        Require(ids, nameof(ids), DType.I32); RequireF32(dtable, nameof(dtable));
        _tx.EmbeddingBackward(Compute("EmbeddingBackward", dout), ids.Data, dout.Data, dtable.Data, checked((int)ids.Count), dtable.Columns, dtable.Rows);
    }

    // --- cross-entropy: GEMM per vocabulary chunk + the chunk kernels --------------------------------

    public (double Loss, int Count) CrossEntropyForward(Tensor hidden, Tensor weight, Tensor labels, Tensor lse, int chunk)
    {
        Require(labels, nameof(labels), DType.I32); RequireF32(lse, nameof(lse));
        var dtype = Compute("CrossEntropyForward", hidden, weight);
        int rows = hidden.Rows, vocab = weight.Rows;
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(chunk);
        var hostLabels = new int[rows];
        Download<int>(labels, hostLabels);
        GpuLossOps.ValidateLabels(hostLabels, vocab);
        chunk = Math.Min(chunk, vocab);
        var state = _memory.Allocate(DType.F32, 4, rows); // running max, running sum, label logit, loss per row
        var z = _memory.Allocate(dtype, rows, chunk);
        try
        {
            DevicePtr max = state.RowSlice(0, 1).Data, sum = state.RowSlice(1, 1).Data, label = state.RowSlice(2, 1).Data, loss = state.RowSlice(3, 1).Data;
            _loss.Init(max, sum, label, rows);
            for (int v0 = 0; v0 < vocab; v0 += chunk)
            {
                int c = Math.Min(chunk, vocab - v0);
                var zc = z.Slice(0, rows, c);
                Matmul(hidden, false, weight.RowSlice(v0, c), true, zc);
                _loss.ChunkForward(dtype, zc.Data, rows, c, c, v0, labels.Data, max, sum, label);
            }
            _loss.Finish(max, sum, label, labels.Data, rows, vocab, lse.Data, loss);
            var perRow = new float[rows];
            Download<float>(state.RowSlice(3, 1).Reshape(rows), perRow);
            return GpuLossOps.MeanLoss(perRow, hostLabels);
        }
        finally { _memory.Free(z); _memory.Free(state); }
    }

    public void CrossEntropyBackward(Tensor hidden, Tensor weight, Tensor labels, Tensor lse, double dloss, Tensor dhidden, Tensor? dweight, int chunk)
    {
        Require(labels, nameof(labels), DType.I32); RequireF32(lse, nameof(lse));
        var dtype = Compute("CrossEntropyBackward", hidden, weight, dhidden);
        if (dweight is not null && dweight.DType != dtype && !(dtype == DType.BF16 && dweight.DType == DType.F32))
            throw new ArgumentException($"dweight: {dweight} with {dtype} activations (expected {dtype}, or F32 with BF16)", nameof(dweight));
        int rows = hidden.Rows, vocab = weight.Rows;
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(chunk);
        var hostLabels = new int[rows];
        Download<int>(labels, hostLabels);
        int count = hostLabels.Count(l => l != GpuLossOps.IgnoreIndex);
        float scale = GpuLossOps.BackwardScale(dloss, count);
        chunk = Math.Min(chunk, vocab);
        var z = _memory.Allocate(dtype, rows, chunk);
        // bf16 activations over several chunks: dhidden is summed over the chunks in an fp32 buffer and rounded once at
        // the end (as one GEMM with fp32 accumulation would), not rounded to bf16 after every chunk.
        Tensor? sum = dtype == DType.BF16 && vocab > chunk ? _memory.Allocate(DType.F32, rows, hidden.Columns) : null;
        try
        {
            var acc = sum ?? dhidden;
            Fill(acc, 0);
            for (int v0 = 0; v0 < vocab; v0 += chunk)
            {
                int c = Math.Min(chunk, vocab - v0);
                var zc = z.Slice(0, rows, c);
                var wc = weight.RowSlice(v0, c);
                Matmul(hidden, false, wc, true, zc);
                _loss.ChunkBackward(dtype, zc.Data, rows, c, c, v0, labels.Data, lse.Data, scale);
                Matmul(zc, false, wc, false, acc, 1, 1);                              // dhidden += dz · W_chunk
                if (dweight is not null) Matmul(zc, true, hidden, false, dweight.RowSlice(v0, c), 1, 1); // dW_chunk += dzᵀ · hidden
            }
            if (sum is not null) Copy(sum, dhidden);
            _gpu.Synchronize();
        }
        finally
        {
            if (sum is not null) _memory.Free(sum);
            _memory.Free(z);
        }
    }

    public void Dispose()
    {
        _memory.Dispose();
        if (_ownsGpu) _gpu.Dispose();
    }
}
