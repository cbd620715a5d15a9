using NativePeft.Numerics;
using NativePeft.Ops;

namespace NativePeft.Modules;

public sealed partial class LlamaModel
{
    /// <summary>
    /// A key/value cache for incremental decoding of one sequence (batch 1) of up to <paramref name="maxLength"/> tokens:
    /// per layer K (after RoPE) and V [maxLength, Hkv·D] in the compute dtype, allocated from <see cref="Ops"/>' memory
    /// and freed when the cache is disposed. Feed the prompt with <see cref="LlamaKvCache.Forward"/> (prefill), then one
    /// token at a time.
    /// </summary>
    public LlamaKvCache CreateKvCache(int maxLength)
    {
        if (maxLength < 1 || maxLength > Config.MaxPositionEmbeddings)
            throw new ArgumentOutOfRangeException(nameof(maxLength), maxLength,
                $"the cache length must be in [1, max_position_embeddings = {Config.MaxPositionEmbeddings}]");
        EnsureRope(maxLength);
        return new LlamaKvCache(this, maxLength);
    }

    /// <summary>The cached forward: see <see cref="LlamaKvCache.Forward"/>. Stores no activations for a backward.</summary>
    internal void CachedForward(LlamaKvCache cache, ReadOnlySpan<int> tokens, bool allPositions, Span<double> logits)
    {
        int n = tokens.Length, p = cache.Length, V = Config.VocabSize;
        EnsureRope(p + n); // training may have swapped the tables since the cache was made; never shrinks them
        var w = cache.Workspace(n, allPositions ? n : 1);
        int Hq = Config.NumAttentionHeads, Hkv = Config.NumKeyValueHeads, D = Config.HeadDim, KVD = Config.KeyValueDim;
        var positions = new int[n];
        for (int i = 0; i < n; i++) positions[i] = p + i;
        var ids = w.Ids.Slice(0, n);
        var pos = w.Positions.Slice(0, n);
        _ops.Upload(tokens, ids);
        _ops.Upload<int>(positions, pos);

        // Inference: dropout off, and the LoRA layers' xa scratch pointed at this cache's (restored afterwards, so a
        // training batch's activations stay as they were).
        bool training = Dropout.Training;
        var savedXa = _loraScratch.Xa;
        var (savedAWork, savedBWork) = (_loraScratch.AWork, _loraScratch.BWork);
        Dropout.Training = false;
        if (w.Xa is not null) _loraScratch.Xa = w.Xa;
        if (w.AWork is not null) (_loraScratch.AWork, _loraScratch.BWork) = (w.AWork, w.BWork);
        try
        {
            var x = w.X0.Slice(0, n, Config.HiddenSize);
            var y = w.X1.Slice(0, n, Config.HiddenSize);
            var normed = w.N.Slice(0, n, Config.HiddenSize);
            var rstd = w.Rstd.Slice(0, n);
            var q = w.Q.Slice(0, n, Config.QueryDim);
            var att = w.Att.Slice(0, n, Config.QueryDim);
            var h = w.H.Slice(0, n, Config.HiddenSize);
            var gate = w.G.Slice(0, n, Config.IntermediateSize);
            var up = w.U.Slice(0, n, Config.IntermediateSize);
            var act = w.A.Slice(0, n, Config.IntermediateSize);
            Embed(tokens, ids, x);
            for (int l = 0; l < _layers.Length; l++)
            {
                var layer = _layers[l];
                var kNew = cache.K[l].Slice((long)p * KVD, n, KVD);
                var vNew = cache.V[l].Slice((long)p * KVD, n, KVD);
                _ops.RmsNormForward(x, layer.InputLayernorm, normed, rstd, Config.RmsNormEps);
                layer.QProj.Forward(normed, q);
                layer.KProj.Forward(normed, kNew);
                layer.VProj.Forward(normed, vNew);
                _ops.RopeForward(q, pos, _ropeCos!, _ropeSin!, Hq, D);
                _ops.RopeForward(kNew, pos, _ropeCos!, _ropeSin!, Hkv, D);
                // The MLP's gate buffer is free until the MLP runs: the split-KV decode keeps its partials there.
                _ops.AttentionForwardCached(q, cache.K[l].Slice(0, p + n, KVD), cache.V[l].Slice(0, p + n, KVD), att, null,
                    1, n, p + n, Hq, Hkv, D, workspace: w.G);
                layer.OProj.Forward(att, h);
                _ops.Add(x, h, h);
                _ops.RmsNormForward(h, layer.PostAttentionLayernorm, normed, rstd, Config.RmsNormEps);
                layer.GateProj.Forward(normed, gate);
                layer.UpProj.Forward(normed, up);
                _ops.SwiGluForward(gate, up, act);
                layer.DownProj.Forward(act, y);
                _ops.Add(h, y, y);
                (x, y) = (y, x);
            }
            int rows = allPositions ? n : 1;
            var last = x.RowSlice(n - rows, rows);
            var lastNormed = normed.RowSlice(0, rows);
            _ops.RmsNormForward(last, Norm, lastNormed, rstd.Slice(0, rows), Config.RmsNormEps);
            var logitsT = w.Logits.Slice(0, rows, V);
            _ops.Matmul(lastNormed, false, LmHead, true, logitsT);
            DownloadAsDouble(logitsT, logits[..(rows * V)]);
        }
        finally
        {
            Dropout.Training = training;
            _loraScratch.Xa = savedXa;
            (_loraScratch.AWork, _loraScratch.BWork) = (savedAWork, savedBWork);
        }
        cache.Length = p + n;
    }

    private void DownloadAsDouble(Tensor t, Span<double> destination)
    {
        switch (t.DType)
        {
            case DType.F64:
                _ops.Download(t, destination);
                break;
            case DType.F32:
            {
                var f = new float[t.Count];
                _ops.Download<float>(t, f);
                for (int i = 0; i < f.Length; i++) destination[i] = f[i];
                break;
            }
            default:
                throw new InvalidOperationException($"logits in {t.DType}: expected F32 or F64");
        }
    }
}

/// <summary>
/// The key/value cache of one sequence for <see cref="LlamaModel"/> (made by <see cref="LlamaModel.CreateKvCache"/>):
/// per layer K (after RoPE) and V, [<see cref="MaxLength"/>, Hkv·D] each in the compute dtype, and a workspace for the
/// tokens of one <see cref="Forward"/> (the prompt in the prefill, then one token). Everything comes from the model's
/// <see cref="IOps.Memory"/> and is freed by <see cref="Dispose"/>. The forward applies LoRA unmerged with dropout off,
/// exactly as the training forward does in eval, and keeps no activations.
/// </summary>
public sealed class LlamaKvCache : IDisposable
{
    private readonly LlamaModel _model;
    private readonly TensorArena _cache;
    private TensorArena? _workArena;
    private Work? _work;
    private bool _disposed;

    internal Tensor[] K { get; }
    internal Tensor[] V { get; }

    /// <summary>Tokens the cache can hold.</summary>
    public int MaxLength { get; }
    /// <summary>Tokens held now (the next token's position).</summary>
    public int Length { get; internal set; }
    /// <summary>Bytes of the K and V tensors: 2 · layers · MaxLength · Hkv·D · element size.</summary>
    public long CacheBytes { get; }
    /// <summary>Bytes of the workspace for the largest forward so far.</summary>
    public long WorkspaceBytes => _workArena?.Bytes ?? 0;

    /// <summary>Bytes the K/V tensors of a cache of <paramref name="maxLength"/> tokens take for a model.</summary>
    public static long BytesFor(IO.LlamaConfig config, int maxLength, DType dtype)
    {
        ArgumentNullException.ThrowIfNull(config);
        return 2L * config.NumHiddenLayers * maxLength * config.KeyValueDim * dtype.ElementSize();
    }

    internal LlamaKvCache(LlamaModel model, int maxLength)
    {
        _model = model;
        MaxLength = maxLength;
        var c = model.Config;
        _cache = new TensorArena(model.Ops.Memory);
        try
        {
            K = new Tensor[c.NumHiddenLayers];
            V = new Tensor[c.NumHiddenLayers];
            var specs = ModelLayout.KvCache(c, model.LayoutOptions, maxLength).ToDictionary(t => t.Name);
            for (int l = 0; l < c.NumHiddenLayers; l++)
            {
                K[l] = _cache.Allocate(specs[$"layers.{l}.k_cache"]);
                V[l] = _cache.Allocate(specs[$"layers.{l}.v_cache"]);
            }
        }
        catch
        {
            _cache.Dispose();
            throw;
        }
        CacheBytes = BytesFor(c, maxLength, model.ComputeDType);
    }

    /// <summary>
    /// Runs <paramref name="tokens"/> (at positions Length … Length + n − 1) through the model, appends their keys and
    /// values to the cache, and writes the logits into <paramref name="logits"/>: of the last token [V], or with
    /// <paramref name="allPositions"/> of every token [n, V] (row i = the full forward's logits at position Length + i).
    /// </summary>
    public void Forward(ReadOnlySpan<int> tokens, Span<double> logits, bool allPositions = false)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (tokens.IsEmpty) throw new ArgumentException("no tokens", nameof(tokens));
        if (Length + tokens.Length > MaxLength)
            throw new ArgumentOutOfRangeException(nameof(tokens),
                $"{Length} cached + {tokens.Length} new tokens exceed the cache length {MaxLength}");
        int V = _model.Config.VocabSize;
        foreach (int id in tokens)
            if ((uint)id >= (uint)V) throw new ArgumentOutOfRangeException(nameof(tokens), id, $"token id outside the vocabulary [0, {V})");
        long need = (long)(allPositions ? tokens.Length : 1) * V;
        if (logits.Length < need) throw new ArgumentException($"logits has {logits.Length} elements, needs {need}", nameof(logits));
        _model.CachedForward(this, tokens, allPositions, logits);
    }

    /// <summary>The specs of the cache's tensors and of its workspace, in allocation order (tests compare them with <see cref="ModelLayout"/>).</summary>
    internal IReadOnlyList<TensorSpec> AllocatedTensors => [.. _cache.Allocated, .. _workArena?.Allocated ?? []];

    /// <summary>Forgets the cached tokens (the next forward starts at position 0); keeps the memory.</summary>
    public void Reset() => Length = 0;

    /// <summary>The workspace for a forward of <paramref name="tokens"/> tokens with <paramref name="logitRows"/> rows of logits.</summary>
    internal Work Workspace(int tokens, int logitRows)
    {
        if (_work is { } w && w.Capacity >= tokens && w.LogitRows >= logitRows) return w;
        tokens = Math.Max(tokens, _work?.Capacity ?? 0);
        logitRows = Math.Max(logitRows, _work?.LogitRows ?? 0);
        _workArena?.Dispose();
        _work = null;
        _workArena = null;
        int capacity = Math.Max(tokens, Math.Min(MaxLength, 16));
        var arena = new TensorArena(_model.Ops.Memory);
        try
        {
            var specs = ModelLayout.CacheWorkspace(_model.Config, _model.LayoutOptions, capacity, logitRows).ToDictionary(t => t.Name);
            _work = new Work(_model, name => arena.Allocate(specs["cache." + name]), capacity, logitRows);
            _workArena = arena;
            return _work;
        }
        catch
        {
            arena.Dispose();
            throw;
        }
    }

    /// <summary>The tensors of <see cref="ModelLayout.CacheWorkspace"/> ("cache.*"), each allocated by name with <paramref name="m"/>.</summary>
    internal sealed class Work(LlamaModel model, Func<string, Tensor> m, int n, int logitRows)
    {
        public readonly int Capacity = n, LogitRows = logitRows;
        public readonly Tensor Ids = m("input_ids"), Positions = m("position_ids");
        public readonly Tensor X0 = m("x0"), X1 = m("x1"), N = m("normed"), Rstd = m("rstd");
        public readonly Tensor Q = m("q"), Att = m("attention"), H = m("h");
        public readonly Tensor G = m("gate"), U = m("up"), A = m("silu_up");
        // With BF16 compute the lm_head GEMM writes fp32 logits directly (bf16 inputs, fp32 accumulate and output).
        public readonly Tensor Logits = m("logits");
        public readonly Tensor? Xa = model.LoraLayers.Count == 0 ? null : m("lora.xa");
        // Mixed precision (fp32 adapters, bf16 activations): the adapters' bf16 working copies, as the training scratch has.
        public readonly Tensor? AWork = model.LoraLayers.Count == 0 || model.AdapterDType == model.ComputeDType ? null : m("lora.a_work");
        public readonly Tensor? BWork = model.LoraLayers.Count == 0 || model.AdapterDType == model.ComputeDType ? null : m("lora.b_work");
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _workArena?.Dispose();
        _workArena = null;
        _work = null;
        _cache.Dispose();
    }
}
