using System.Diagnostics;

namespace NativePeft.Ops;

/// <summary>
/// An <see cref="IOps"/> that times every call of the ops it wraps (synchronizing the device after each, so the
/// times are the ops' own): where a training step's time goes, by op. For profiling runs, not for training.
/// </summary>
public sealed class ProfilingOps(IOps inner, bool ownsInner = false) : IOps
{
    private readonly IOps _inner = inner;
    private readonly Dictionary<string, (int Calls, double Ms)> _totals = [];

    /// <summary>Calls and milliseconds per op name since the last <see cref="Reset"/>.</summary>
    public IReadOnlyDictionary<string, (int Calls, double Ms)> Totals => _totals;
    public double TotalMs => _totals.Values.Sum(v => v.Ms);
    public void Reset() => _totals.Clear();

    public string Name => _inner.Name;
    public TensorMemory Memory => _inner.Memory;
    public Runtime.IGpu? Device => _inner.Device;

    private static long Start() => Stopwatch.GetTimestamp();

    private void Stop(string op, long start)
    {
        _inner.Device?.Synchronize();
        double ms = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
        _totals[op] = _totals.TryGetValue(op, out var v) ? (v.Calls + 1, v.Ms + ms) : (1, ms);
    }

    public void Upload<T>(ReadOnlySpan<T> source, Tensor destination) where T : unmanaged { var t = Start(); _inner.Upload<T>(source, destination); Stop("Upload", t); }
    public void Download<T>(Tensor source, Span<T> destination) where T : unmanaged { var t = Start(); _inner.Download<T>(source, destination); Stop("Download", t); }
    public void Fill(Tensor x, double value) { var t = Start(); _inner.Fill(x, value); Stop("Fill", t); }
    public void Copy(Tensor source, Tensor destination) { var t = Start(); _inner.Copy(source, destination); Stop("Copy", t); }
    public void Add(Tensor a, Tensor b, Tensor c) { var t = Start(); _inner.Add(a, b, c); Stop("Add", t); }
    public void Axpy(double alpha, Tensor x, Tensor y) { var t = Start(); _inner.Axpy(alpha, x, y); Stop("Axpy", t); }
    public void Scale(Tensor x, double alpha) { var t = Start(); _inner.Scale(x, alpha); Stop("Scale", t); }
    public void Dropout(Tensor x, Tensor mask, double p, ulong seed, Tensor y) { var t = Start(); _inner.Dropout(x, mask, p, seed, y); Stop("Dropout", t); }
    public void DropoutBackward(Tensor dy, Tensor mask, double p, Tensor dx) { var t = Start(); _inner.DropoutBackward(dy, mask, p, dx); Stop("DropoutBackward", t); }
    public void Matmul(Tensor a, bool transA, Tensor b, bool transB, Tensor c, double alpha = 1, double beta = 0) { var t = Start(); _inner.Matmul(a, transA, b, transB, c, alpha, beta); Stop("Matmul", t); }
    public void LoraDown(Tensor x, IReadOnlyList<LoraDownArgs> adapters) { var t = Start(); _inner.LoraDown(x, adapters); Stop("LoraDown", t); }
    public void LoraBackwardInput(Tensor x, IReadOnlyList<LoraBackwardArgs> adapters, Tensor dx) { var t = Start(); _inner.LoraBackwardInput(x, adapters, dx); Stop("LoraBackwardInput", t); }
    public void Dequantize4bit(QuantizedWeight weight, int firstRow, Tensor output) { var t = Start(); _inner.Dequantize4bit(weight, firstRow, output); Stop("Dequantize4bit", t); }
    public bool TryGemv4bit(Tensor x, QuantizedWeight weight, Tensor y) { var t = Start(); bool done = _inner.TryGemv4bit(x, weight, y); if (done) Stop("Gemv4bit", t); return done; }
    public void RmsNormForward(Tensor x, Tensor weight, Tensor y, Tensor rstd, double eps) { var t = Start(); _inner.RmsNormForward(x, weight, y, rstd, eps); Stop("RmsNormForward", t); }
    public void RmsNormBackward(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor dx, Tensor? dweight, bool accumulate = false) { var t = Start(); _inner.RmsNormBackward(dy, x, weight, rstd, dx, dweight, accumulate); Stop("RmsNormBackward", t); }
    public void RopeForward(Tensor x, Tensor positions, Tensor cos, Tensor sin, int heads, int headDim) { var t = Start(); _inner.RopeForward(x, positions, cos, sin, heads, headDim); Stop("RopeForward", t); }
    public void RopeBackward(Tensor dx, Tensor positions, Tensor cos, Tensor sin, int heads, int headDim) { var t = Start(); _inner.RopeBackward(dx, positions, cos, sin, heads, headDim); Stop("RopeBackward", t); }
    public void AttentionForward(Tensor q, Tensor k, Tensor v, Tensor output, Tensor lse, int batch, int seqLen, int headsQ, int headsKv, int headDim, Tensor? positions = null) { var t = Start(); _inner.AttentionForward(q, k, v, output, lse, batch, seqLen, headsQ, headsKv, headDim, positions); Stop("AttentionForward", t); }
    public void AttentionForwardCached(Tensor q, Tensor k, Tensor v, Tensor output, Tensor? lse, int batch, int queryLen, int keyLen, int headsQ, int headsKv, int headDim, Tensor? workspace = null) { var t = Start(); _inner.AttentionForwardCached(q, k, v, output, lse, batch, queryLen, keyLen, headsQ, headsKv, headDim, workspace); Stop("AttentionForwardCached", t); }
    public void AttentionBackward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor output, Tensor lse, Tensor dq, Tensor dk, Tensor dv, int batch, int seqLen, int headsQ, int headsKv, int headDim, Tensor? positions = null) { var t = Start(); _inner.AttentionBackward(dout, q, k, v, output, lse, dq, dk, dv, batch, seqLen, headsQ, headsKv, headDim, positions); Stop("AttentionBackward", t); }
    public void SwiGluForward(Tensor gate, Tensor up, Tensor h) { var t = Start(); _inner.SwiGluForward(gate, up, h); Stop("SwiGluForward", t); }
    public void SwiGluBackward(Tensor dh, Tensor gate, Tensor up, Tensor dgate, Tensor dup) { var t = Start(); _inner.SwiGluBackward(dh, gate, up, dgate, dup); Stop("SwiGluBackward", t); }
    public void EmbeddingForward(Tensor ids, Tensor table, Tensor output) { var t = Start(); _inner.EmbeddingForward(ids, table, output); Stop("EmbeddingForward", t); }
    public void EmbeddingBackward(Tensor ids, Tensor dout, Tensor dtable) { var t = Start(); _inner.EmbeddingBackward(ids, dout, dtable); Stop("EmbeddingBackward", t); }
    public (double Loss, int Count) CrossEntropyForward(Tensor hidden, Tensor weight, Tensor labels, Tensor lse, int chunk) { var t = Start(); var r = _inner.CrossEntropyForward(hidden, weight, labels, lse, chunk); Stop("CrossEntropyForward", t); return r; }
    public void CrossEntropyBackward(Tensor hidden, Tensor weight, Tensor labels, Tensor lse, double dloss, Tensor dhidden, Tensor? dweight, int chunk) { var t = Start(); _inner.CrossEntropyBackward(hidden, weight, labels, lse, dloss, dhidden, dweight, chunk); Stop("CrossEntropyBackward", t); }

    public double SumOfSquares(IReadOnlyList<Tensor> tensors) { var t = Start(); double r = _inner.SumOfSquares(tensors); Stop("SumOfSquares", t); return r; }

    public void Dispose() { if (ownsInner) _inner.Dispose(); }
}
