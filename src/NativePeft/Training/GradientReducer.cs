using System.Globalization;
using NativePeft.Distributed;
using NativePeft.Ops;

namespace NativePeft.Training;

/// <summary>
/// Data-parallel training's gradient all-reduce in buckets (docs/distributed.md, "Data-parallel training"). The trainable
/// gradients are ordered as the backward finishes them — the last decoder layer's first, down to layer 0, then the rest
/// (embedding, final norm, lm_head) — and grouped into buckets of about <see cref="TrainerOptions.GradientBucketBytes"/>.
/// During a rank's last backward of a step, <see cref="Ready"/> (hooked to <see cref="Modules.LlamaModel.GradientsReady"/>)
/// starts each bucket's <see cref="ICommunicator.AllReduceAsync"/> as soon as its last layer is done, so the reduction
/// overlaps the rest of the backward; <see cref="Finish"/> starts what is left and waits for all. Every rank starts the
/// same buckets in the same order (the bucket list depends only on the model), as the communicator requires.
/// A bucket of several tensors is reduced through one flat buffer (the gradients are copied in and back out); a tensor
/// of at least the bucket size is a bucket of its own and is reduced in place.
/// </summary>
internal sealed class GradientReducer : IDisposable
{
    private sealed class Bucket
    {
        public required List<Tensor> Grads { get; init; }
        /// <summary>Position (in backward order) of the stage that finishes the bucket's last gradient.</summary>
        public required int Stage { get; init; }
        public Tensor? Flat { get; set; }
        public ICommRequest? Request { get; set; }
    }

    private readonly ICommunicator _comm;
    private readonly IOps _ops;
    private readonly List<Bucket> _buckets = [];
    private readonly int _layers;
    private double _premultiply;
    private int _started;

    /// <summary>The gradient bytes reduced per step (every trainable gradient once).</summary>
    public long Bytes { get; }
    public int BucketCount => _buckets.Count;

    public GradientReducer(ICommunicator comm, IOps ops, IReadOnlyList<(string Name, Tensor Param, Tensor Grad)> trainable,
        int layers, long bucketBytes)
    {
        _comm = comm;
        _ops = ops;
        _layers = layers;
        // Stage position in the order the backward finishes them: layer L−1 → 0, …, layer 0 → L−1, the rest → L.
        var ordered = trainable.Select((p, i) => (p.Grad, Stage: StageOf(p.Name, layers), Index: i))
            .OrderBy(x => x.Stage).ThenBy(x => x.Index).ToList();
        List<Tensor> current = [];
        long currentBytes = 0;
        int currentStage = 0;
        void Close()
        {
            if (current.Count == 0) return;
            var bucket = new Bucket { Grads = current, Stage = currentStage };
            if (current.Count > 1)
                bucket.Flat = ops.Memory.Allocate(MemoryRegion.Persistent, current[0].DType, checked((int)current.Sum(g => g.Count)));
            _buckets.Add(bucket);
            current = [];
            currentBytes = 0;
        }
        foreach (var (grad, stage, _) in ordered)
        {
            if (current.Count > 0 && (currentBytes + grad.Bytes > bucketBytes || grad.DType != current[0].DType)) Close();
            current.Add(grad);
            currentBytes += grad.Bytes;
            currentStage = stage;
        }
        Close();
        Bytes = trainable.Sum(p => p.Grad.Bytes);
    }

    /// <summary>Backward-order position of a parameter: layer l's (".layers.l." in its name) is L−1−l, the others' L.</summary>
    private static int StageOf(string name, int layers)
    {
        const string marker = ".layers.";
        int at = name.IndexOf(marker, StringComparison.Ordinal);
        if (at < 0) return layers;
        int start = at + marker.Length, end = name.IndexOf('.', start);
        if (end < 0 || !int.TryParse(name.AsSpan(start, end - start), NumberStyles.None, CultureInfo.InvariantCulture, out int l) || l >= layers)
            return layers;
        return layers - 1 - l;
    }

    /// <summary>Arms the reducer for a step: every bucket will be reduced as Σ_ranks <paramref name="premultiply"/> · g.</summary>
    public void Begin(double premultiply)
    {
        _premultiply = premultiply;
        _started = 0;
        foreach (var b in _buckets) b.Request = null;
    }

    /// <summary>
    /// The backward finished layer <paramref name="layer"/> (or, with -1, everything): starts every bucket whose
    /// gradients are now final.
    /// </summary>
    public void Ready(int layer)
    {
        int stage = layer < 0 ? _layers : _layers - 1 - layer;
        while (_started < _buckets.Count && _buckets[_started].Stage <= stage) Start(_buckets[_started++]);
    }

    private void Start(Bucket b)
    {
        if (b.Flat is not { } flat)
        {
            b.Request = _comm.AllReduceAsync(_ops, b.Grads[0], _premultiply);
            return;
        }
        long offset = 0;
        foreach (var g in b.Grads)
        {
            _ops.Copy(g, flat.Slice(offset, [.. g.Shape]));
            offset += g.Count;
        }
        b.Request = _comm.AllReduceAsync(_ops, flat, _premultiply);
    }

    /// <summary>Starts the buckets not started yet, then waits for every bucket and copies flat buffers back.</summary>
    public void Finish()
    {
        Ready(-1);
        foreach (var b in _buckets)
        {
            b.Request!.Wait();
            b.Request = null;
            if (b.Flat is not { } flat) continue;
            long offset = 0;
            foreach (var g in b.Grads)
            {
                _ops.Copy(flat.Slice(offset, [.. g.Shape]), g);
                offset += g.Count;
            }
        }
    }

    public void Dispose()
    {
        foreach (var b in _buckets)
            if (b.Flat is { } flat)
            {
                _ops.Memory.Free(flat);
                b.Flat = null;
            }
    }
}
