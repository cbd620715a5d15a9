using NativePeft.Quantization;

namespace NativePeft.Ops;

/// <summary>
/// The op set the modules call (docs/design.md). Two implementations: <see cref="CpuOps"/> (the C# references over host
/// memory, fp32, and fp64 for gradient checks) and <see cref="GpuOps"/> (the kernels of kernels/*.cu on an IGpu, with
/// GEMMs through cuBLAS or, on the emulator, the host BLAS). Every tensor is row-major; an op never allocates the
/// tensors it writes. Outputs are overwritten unless the parameter says "accumulates" (+=).
/// </summary>
public interface IOps : IDisposable
{
    /// <summary>"CPU reference", or the device's name.</summary>
    string Name { get; }

    /// <summary>Where this backend's tensors live.</summary>
    TensorMemory Memory { get; }

    /// <summary>
    /// The device the ops run on (its kernels, managed memory and stream), or null for the CPU reference. Layers above
    /// Ops (the optimizers, profiling) reach the device through this, never by naming a concrete ops or device class,
    /// so a wrapper such as <see cref="ProfilingOps"/> keeps the device paths.
    /// </summary>
    Runtime.IGpu? Device { get; }

    /// <summary>
    /// Σ x² over the F32 <paramref name="tensors"/>, in fp64 (each element squared exactly in double), deterministic:
    /// on the CPU the sequential sum in order, element by element; on a device kernels/optim.cu's fixed-grid pass per
    /// tensor and a fixed-order reduction, tensors added in order (the same value on every device). Gradient clipping's
    /// global norm.
    /// </summary>
    double SumOfSquares(IReadOnlyList<Tensor> tensors);

    // --- data movement -------------------------------------------------------------------------
    /// <summary>Host → tensor; T is the tensor's element type (float for F32, double for F64, BFloat16 for BF16, int for I32, byte for U8).</summary>
    void Upload<T>(ReadOnlySpan<T> source, Tensor destination) where T : unmanaged;
    /// <summary>Tensor → host; T as for <see cref="Upload{T}"/>.</summary>
    void Download<T>(Tensor source, Span<T> destination) where T : unmanaged;
    void Fill(Tensor x, double value);
    /// <summary>Same element count; converts between float dtypes (round to nearest even when narrowing).</summary>
    void Copy(Tensor source, Tensor destination);

    // --- elementwise -----------------------------------------------------------------------------
    /// <summary>c = a + b (c may be a or b).</summary>
    void Add(Tensor a, Tensor b, Tensor c);
    /// <summary>y += alpha · x.</summary>
    void Axpy(double alpha, Tensor x, Tensor y);
    /// <summary>x *= alpha.</summary>
    void Scale(Tensor x, double alpha);

    /// <summary>
    /// Dropout: mask (U8, same count as x) gets 1 where an element is kept, with probability 1 − p, drawn from a
    /// counter-based generator (Philox-4x32-10 of (seed, element index): GpuElementwiseOps.DropoutMaskHost and the
    /// dropout_mask kernel) so the mask is the same on every device and needs no state;
    /// y = x · mask / (1 − p) (y may be x). p = 0 keeps everything.
    /// </summary>
    void Dropout(Tensor x, Tensor mask, double p, ulong seed, Tensor y);
    /// <summary>dx = dy · mask / (1 − p) (dx may be dy), with the mask <see cref="Dropout"/> wrote.</summary>
    void DropoutBackward(Tensor dy, Tensor mask, double p, Tensor dx);

    // --- GEMM ------------------------------------------------------------------------------------
    /// <summary>
    /// C = alpha · op(A) · op(B) + beta · C, with fp32 accumulation (fp64 for F64). A is [m, k] ([k, m] when
    /// <paramref name="transA"/>), B is [k, n] ([n, k] when <paramref name="transB"/>), C is [m, n]; the tensors are
    /// read as matrices [Rows, Columns]. A linear layer is Matmul(x, false, W, true, y). A and B share a dtype; C has
    /// it too, or (GPU ops) is F32 with BF16 A and B: bf16 inputs, fp32 accumulation and output (mixed-precision gradients).
    /// </summary>
    void Matmul(Tensor a, bool transA, Tensor b, bool transB, Tensor c, double alpha = 1, double beta = 0);

    // --- LoRA (the rank-r paths of adapters sharing one input) ----------------------------------
    /// <summary>
    /// For each adapter g: Xa_g [N, r_g] = dropout(x; p_g, seed_g) · A_gᵀ, with x [N, in] read once for all of them on
    /// the GPU (kernels/lora.cu; q, k, v share their input, so do gate and up). The dropout mask of adapter g is the one
    /// <see cref="Dropout"/> draws on x with seed_g (Philox of (seed, element index of x)), redrawn, never stored; kept
    /// elements are x / (1 − p) (rounded to the compute dtype, as <see cref="Dropout"/> writes them). A_g and Xa_g in the
    /// compute dtype.
    /// </summary>
    void LoraDown(Tensor x, IReadOnlyList<LoraDownArgs> adapters);
    /// <summary>
    /// The input side of the adapters' backward: dx [N, in] += Σ_g mask_g ∘ (DXa_g · A_g) / (1 − p_g) (accumulates), and
    /// DA_g [r_g, in] += DXa_gᵀ · dropout(x; p_g, seed_g) (accumulates; F32 on the GPU), with the masks of
    /// <see cref="LoraDown"/>. Deterministic (fixed summation orders, no atomics).
    /// </summary>
    void LoraBackwardInput(Tensor x, IReadOnlyList<LoraBackwardArgs> adapters, Tensor dx);

    // --- 4-bit weights ---------------------------------------------------------------------------
    /// <summary>Rows [firstRow, firstRow + output.Rows) of the 4-bit weight, dequantized into <paramref name="output"/> [rows, columns].</summary>
    void Dequantize4bit(QuantizedWeight weight, int firstRow, Tensor output);
    /// <summary>
    /// One token through a 4-bit weight, y [1, out] = x [1, in] · Wᵀ, reading the packed weight once (no dequantized
    /// copy): each weight rounded to the compute dtype as <see cref="Dequantize4bit"/> rounds it, fp32 products and
    /// sum. Returns false, computing nothing, where the ops have no such kernel (the caller dequantizes and multiplies).
    /// </summary>
    bool TryGemv4bit(Tensor x, QuantizedWeight weight, Tensor y);

    // --- transformer ops (semantics: ops/Reference/*Ref.cs) --------------------------------------
    /// <summary>y = weight · x · rstd per row; x, y [N, C] (y may be x), weight [C], rstd [N] (saved for the backward).</summary>
    void RmsNormForward(Tensor x, Tensor weight, Tensor y, Tensor rstd, double eps);
    /// <summary>dx (overwritten, or += with <paramref name="accumulate"/>: the residual stream's gradient takes the
    /// norm's in the same pass, dx then apart from dy and x); dweight accumulates (null: frozen weight).</summary>
    void RmsNormBackward(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor dx, Tensor? dweight, bool accumulate = false);

    /// <summary>
    /// HF rotate_half RoPE in place on x [N, heads · headDim], token n at row positions[n] (I32) of the tables
    /// cos/sin [P, headDim / 2] (F32 on the GPU, the compute dtype on the CPU).
    /// </summary>
    void RopeForward(Tensor x, Tensor positions, Tensor cos, Tensor sin, int heads, int headDim);
    /// <summary>The inverse rotation in place on dx.</summary>
    void RopeBackward(Tensor dx, Tensor positions, Tensor cos, Tensor sin, int heads, int headDim);

    /// <summary>
    /// Causal attention with grouped-query heads: q [B·T, Hq·D], k, v [B·T, Hkv·D], output [B·T, Hq·D],
    /// lse [B, Hq, T] (F32 on the GPU; saved for the backward). <paramref name="positions"/>: null (each row one
    /// sequence), or I32 [B·T] positions inside packed documents (0 at each document start, +1 per token:
    /// Reference.AttentionRef.ValidatePositions), so that query t sees only keys t − positions[t] … t, never another
    /// document.
    /// </summary>
    void AttentionForward(Tensor q, Tensor k, Tensor v, Tensor output, Tensor lse, int batch, int seqLen, int headsQ, int headsKv, int headDim,
        Tensor? positions = null);
    /// <summary>
    /// Attention for queries at an offset, as decoding with a KV cache needs: <paramref name="queryLen"/> new queries
    /// q [B·queryLen, Hq·D] at absolute positions [keyLen − queryLen, keyLen) attend causally to <paramref name="keyLen"/>
    /// keys k, v [B·keyLen, Hkv·D] (the cache, the new tokens' keys included); output [B·queryLen, Hq·D]; lse
    /// [B, Hq, queryLen] (F32 on the GPU) or null (not written). Row i equals row keyLen − queryLen + i of
    /// <see cref="AttentionForward"/> over the whole sequence (the same operations in the same order on the CPU and in
    /// the kernel); queryLen = keyLen is <see cref="AttentionForward"/>. 1 ≤ queryLen ≤ keyLen.
    /// <paramref name="workspace"/>: optional scratch the call may use (any dtype; its bytes are overwritten), free
    /// during the call. On a GPU with bf16 and head dim 64/128, a few queries against a long cache then run split-KV
    /// (flash-decoding, kernels/attention_decode.cu): the splits' partial results live in the workspace, and rows
    /// equal the full forward's within the bf16 rounding of the output (the splits change the order of the sums).
    /// </summary>
    void AttentionForwardCached(Tensor q, Tensor k, Tensor v, Tensor output, Tensor? lse, int batch, int queryLen, int keyLen,
        int headsQ, int headsKv, int headDim, Tensor? workspace = null);
    /// <summary>dq, dk, dv overwritten; <paramref name="positions"/> as given to <see cref="AttentionForward"/>.</summary>
    void AttentionBackward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor output, Tensor lse, Tensor dq, Tensor dk, Tensor dv,
        int batch, int seqLen, int headsQ, int headsKv, int headDim, Tensor? positions = null);

    /// <summary>h = silu(gate) · up, all [N, I].</summary>
    void SwiGluForward(Tensor gate, Tensor up, Tensor h);
    void SwiGluBackward(Tensor dh, Tensor gate, Tensor up, Tensor dgate, Tensor dup);

    /// <summary>output [N, C] = table[ids[n]] with ids I32 [N], table [V, C].</summary>
    void EmbeddingForward(Tensor ids, Tensor table, Tensor output);
    /// <summary>dtable [V, C] accumulates dout rows at ids, in token order.</summary>
    void EmbeddingBackward(Tensor ids, Tensor dout, Tensor dtable);

    /// <summary>
    /// Mean next-token cross-entropy of logits hidden · weightᵀ, computed over <paramref name="chunk"/> vocabulary rows
    /// at a time (the [N, V] logits never exist at once): hidden [N, C], weight [V, C], labels I32 [N] (-100 ignored),
    /// lse [N] (F32 on the GPU; saved). Returns the mean loss (summed in fp64) and the counted tokens.
    /// </summary>
    (double Loss, int Count) CrossEntropyForward(Tensor hidden, Tensor weight, Tensor labels, Tensor lse, int chunk);
    /// <summary>dhidden overwritten with d(dloss · loss)/dhidden; dweight accumulates (null: frozen).</summary>
    void CrossEntropyBackward(Tensor hidden, Tensor weight, Tensor labels, Tensor lse, double dloss, Tensor dhidden, Tensor? dweight, int chunk);
}

/// <summary>A bitsandbytes-layout 4-bit weight [Rows, Columns] on an <see cref="IOps"/>'s device.</summary>
public sealed class QuantizedWeight
{
    public required Tensor Packed { get; init; }
    /// <summary>F32 absmax per block; null when <see cref="DoubleQuant"/> holds it.</summary>
    public Tensor? Absmax { get; init; }
    /// <summary>bitsandbytes' double-quantized absmax as stored (0.127 instead of 0.5 bits per parameter at blocksize 64).</summary>
    public DoubleQuantAbsmax? DoubleQuant { get; init; }
    public required QuantType QuantType { get; init; }
    public required int Blocksize { get; init; }
    public required int Rows { get; init; }
    public required int Columns { get; init; }

    /// <summary>Bytes of the quantization state on the device: the fp32 absmax, or the double-quantized parts.</summary>
    public long StateBytes => Absmax?.Bytes ?? (DoubleQuant is { } d ? d.Absmax.Bytes + d.NestedAbsmax.Bytes + d.NestedQuantMap.Bytes + d.NestedOffset.Bytes : 0);
    /// <summary>Packed codes plus <see cref="StateBytes"/>.</summary>
    public long Bytes => Packed.Bytes + StateBytes;
}

/// <summary>
/// Double-quantized absmax on the device, bitsandbytes' names: absmax[b] = nested_quant_map[Absmax[b]] ·
/// NestedAbsmax[b / 256] + NestedOffset (fp32 multiply, then add; docs/quant-contract.md).
/// </summary>
public sealed class DoubleQuantAbsmax
{
    /// <summary>Nested blocksize: the kernels read 256 (bitsandbytes' only value).</summary>
    public const int NestedBlocksize = 256;
    /// <summary>U8 [blocks]: one 8-bit code per absmax.</summary>
    public required Tensor Absmax { get; init; }
    /// <summary>F32 [ceil(blocks / 256)].</summary>
    public required Tensor NestedAbsmax { get; init; }
    /// <summary>F32 [256]: the map the codes index.</summary>
    public required Tensor NestedQuantMap { get; init; }
    /// <summary>F32 [1]: the mean of the absmax that was subtracted.</summary>
    public required Tensor NestedOffset { get; init; }
}
