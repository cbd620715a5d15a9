using System.Buffers.Binary;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using NativePeft.Data;
using NativePeft.Distributed;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Runtime;
using Microsoft.Extensions.Logging;

namespace NativePeft.Training;

/// <summary>
/// Data-parallel training (docs/distributed.md, "Data-parallel training"). N ranks run the run one rank runs with
/// grad-accum K·N: every rank's batcher yields the same stream of micro-batches; of a step's K·N micro-batches, micro-batch
/// j is trained by rank j mod N with the dropout step the 1-rank run uses for it. Every rank knows every micro-batch's
/// labelled-token count, so the step's total L is known before the backward: a rank accumulates its micro-batches with
/// the same rescaling as one rank (<see cref="Trainer"/>) and its gradients, premultiplied by n_last / L in the
/// all-reduce, sum over the ranks to the step's token-weighted mean gradient. The buckets are reduced during the rank's
/// last backward (<see cref="GradientReducer"/>); then one host all-reduce sums the losses and a non-finite flag, and
/// every rank sees the same norm, the same clip and the same decision to skip or stop.
/// LoRA/QLoRA replicate the optimizer; full fine-tuning shards it (ZeRO-1, <see cref="ZeroPartition"/>).
/// </summary>
public sealed partial class Trainer
{
    private readonly ICommunicator? _comm;
    private GradientReducer? _reducer;
    /// <summary>ZeRO-1 (full fine-tuning, N &gt; 1): the rank that owns each trainable parameter's optimizer state.</summary>
    private int[]? _owner;
    private List<(string Name, Tensor Param, Tensor Grad)>? _owned;
    private HashSet<string>? _ownedNames;

    /// <summary>Ranks of the data-parallel run (1 without a communicator).</summary>
    public int WorldSize => _comm?.WorldSize ?? 1;
    /// <summary>The backend the gradients travel over ("nccl", "cpu"), or null when the step is the plain one-process step.</summary>
    public string? CommunicatorBackend => _comm?.Backend;
    /// <summary>This trainer's rank (0 without a communicator).</summary>
    public int Rank => _comm?.Rank ?? 0;
    /// <summary>Micro-batches per optimizer step over all ranks: grad-accum × world size.</summary>
    public int GlobalGradAccum => Options.GradAccum * WorldSize;
    /// <summary>Rank 0 (or a single process): the one that logs, reports progress and writes.</summary>
    private bool IsRoot => _comm is null || _comm.Rank == 0;
    /// <summary>Bytes of gradients all-reduced per step (0 without a communicator).</summary>
    public long AllReduceBytes => _reducer?.Bytes ?? 0;
    /// <summary>ZeRO-1: the trainable parameters whose optimizer state this rank keeps (null when the state is replicated).</summary>
    internal IReadOnlyList<(string Name, Tensor Param, Tensor Grad)>? OwnedParameters => _owned;

    private void InitDistributed()
    {
        var comm = _comm!;
        _reducer = new GradientReducer(comm, _model.Ops, _model.TrainableParameters, _model.Config.NumHiddenLayers, Options.GradientBucketBytes);
        if (_full)
        {
            _owner = ZeroPartition.Owners(_model.TrainableParameters.Select(p => p.Param.Bytes).ToList(), comm.WorldSize);
            _owned = _model.TrainableParameters.Where((_, i) => _owner[i] == comm.Rank).ToList();
            _ownedNames = _owned.Select(p => p.Name).ToHashSet(StringComparer.Ordinal);
        }
    }

    /// <summary>Cancellation every rank agrees on (one host all-reduce per step when data-parallel).</summary>
    private bool Cancelled(CancellationToken token)
    {
        if (_comm is null) return token.IsCancellationRequested;
        Span<double> flag = [token.IsCancellationRequested ? 1 : 0];
        _comm.AllReduceHost(flag);
        return flag[0] > 0;
    }

    /// <summary>Labelled target positions of a micro-batch, counted as the model counts them (after HF's shift).</summary>
    private static int LabelCount(Batch batch)
    {
        int n = 0;
        foreach (int label in LlamaModel.ShiftLabels(batch.Labels, batch.Rows, batch.SeqLen, batch.Positions ?? []))
            if (label != TrainingExample.IgnoreIndex) n++;
        return n;
    }

    /// <summary>One data-parallel optimizer step (see the class summary); every rank calls it for every step.</summary>
    private StepMetrics DistributedTrainStep()
    {
        var comm = _comm!;
        var reducer = _reducer!;
        var ops = _model.Ops;
        var clock = Stopwatch.StartNew();
        using var range = Nvtx.Range("train step");
        ops.Memory.ResetPeak();
        int stepNumber = _step + 1;
        int worldSize = comm.WorldSize, rank = comm.Rank, micros = GlobalGradAccum;
        _model.ZeroGrad();
        var grads = _model.TrainableParameters.Select(p => p.Grad).ToList();
        // Every rank draws every micro-batch of the step: the data position stays the 1-rank run's, and the token counts are known to all.
        var batches = new Batch[micros];
        var counts = new int[micros];
        long tokens = 0, labelled = 0;
        for (int j = 0; j < micros; j++)
        {
            batches[j] = _batcher.Next();
            tokens += batches[j].Tokens;
            counts[j] = LabelCount(batches[j]);
            labelled += counts[j];
        }
        int last = -1;
        for (int j = rank; j < micros; j += worldSize)
            if (counts[j] > 0) last = j;
        double weightedLoss = 0;
        int previousCount = 0;
        double? nonFinite = null;
        if (labelled > 0) reducer.Begin(last >= 0 ? (double)counts[last] / labelled : 0);
        for (int j = rank; j < micros; j += worldSize)
        {
            if (counts[j] == 0) continue;
            var batch = batches[j];
            _model.Dropout.Step = (long)_step * micros + j;
            double loss = _model.Forward(batch.InputIds, batch.Labels, batch.Rows, batch.SeqLen, batch.Positions);
            int n = _model.LastTokenCount;
            if (n != counts[j])
                throw new InvalidOperationException($"step {stepNumber}, micro-batch {j}: the model counted {n} labelled positions, the trainer {counts[j]}");
            if (!double.IsFinite(loss))
            {
                nonFinite = loss;
                break; // the step is dropped or stops on every rank (decided below); the collectives still run
            }
            if (previousCount > 0 && previousCount != n)
                foreach (var g in grads) ops.Scale(g, (double)previousCount / n);
            if (j == last) _model.GradientsReady = reducer.Ready;
            try { _model.Backward(); }
            finally { _model.GradientsReady = null; }
            previousCount = n;
            weightedLoss += loss * n;
        }
        if (labelled > 0)
            using (Nvtx.Range("gradient all-reduce"))
                reducer.Finish();
        // One host all-reduce: Σ n·loss, and whether (and what) any rank saw a non-finite loss.
        Span<double> sums = [weightedLoss, nonFinite is null ? 0 : 1, nonFinite ?? 0];
        comm.AllReduceHost(sums);
        if (sums[1] == 0) AfterBackward?.Invoke(stepNumber);
        double lr = LearningRateAt(stepNumber);
        if (sums[1] > 0)
        {
            var skip = NonFinite(stepNumber, "the loss", sums[2]);
            return SkipStep(stepNumber, skip.What, skip.Value, lr, tokens, clock);
        }
        if (labelled == 0)
        {
            LogEmptyStep(_logger, stepNumber);
            _step = stepNumber;
            return new StepMetrics(stepNumber, double.NaN, lr, 0, ops.Memory.PeakAllocatedBytes, 0, tokens, clock.Elapsed.TotalSeconds);
        }
        double stepLoss = sums[0] / labelled;
        if (!double.IsFinite(stepLoss))
            return SkipStep(stepNumber, "the loss", NonFinite(stepNumber, "the loss", stepLoss).Value, lr, tokens, clock);
        // The reduced gradients are the step's mean gradient already (the premultiply): gradScale 1.
        return Update(stepNumber, stepLoss, 1.0, grads, lr, tokens, clock);
    }

    /// <summary>ZeRO-1: this rank steps the parameters it owns, then each parameter is broadcast from its owner.</summary>
    private void StepShard(double lr, double gradScale)
    {
        _optimizer.Step(_owned!, lr, gradScale);
        var trainable = _model.TrainableParameters;
        using (Nvtx.Range("parameter broadcast"))
            for (int i = 0; i < trainable.Count; i++)
                _comm!.Broadcast(_model.Ops, trainable[i].Param, _owner![i]);
    }

    /// <summary>Whether this rank loads the checkpoint's optimizer entry <paramref name="stateName"/> ("PARAM.exp_avg", …).</summary>
    private bool KeepsStateOf(string stateName)
    {
        if (_ownedNames is null) return true;
        int dot = stateName.LastIndexOf('.');
        return dot > 0 && _ownedNames.Contains(stateName[..dot]);
    }

    /// <summary>
    /// The optimizer state a checkpoint holds, in the single-rank format: this optimizer's, or with ZeRO-1 every rank's
    /// shard gathered to rank 0 (a collective every rank calls; null on the other ranks), in the trainable parameters' order.
    /// </summary>
    private IReadOnlyList<SafetensorsTensor>? OptimizerStateForCheckpoint()
    {
        if (_owner is null) return IsRoot ? _optimizer.SaveState() : null;
        var comm = _comm!;
        var all = new List<SafetensorsTensor>(IsRoot ? _optimizer.SaveState() : []);
        Span<byte> length = stackalloc byte[8];
        for (int r = 1; r < comm.WorldSize; r++)
        {
            byte[]? blob = comm.Rank == r ? Serialize(_optimizer.SaveState()) : null;
            BinaryPrimitives.WriteInt64LittleEndian(length, blob?.LongLength ?? 0);
            comm.BroadcastHost(length, r);
            blob ??= new byte[checked((int)BinaryPrimitives.ReadInt64LittleEndian(length))];
            comm.BroadcastHost(blob, r);
            if (IsRoot) all.AddRange(Deserialize(blob));
        }
        if (!IsRoot) return null;
        var order = _model.TrainableParameters.Select((p, i) => (p.Name, i)).ToDictionary(x => x.Name, x => x.i, StringComparer.Ordinal);
        return all.OrderBy(t => order.TryGetValue(t.Name[..t.Name.LastIndexOf('.')], out int i) ? i : int.MaxValue).ToList();
    }

    /// <summary>Optimizer state tensors as bytes for the gather: count, then per tensor name, dtype, shape and data.</summary>
    private static byte[] Serialize(IReadOnlyList<SafetensorsTensor> tensors)
    {
        using var ms = new MemoryStream();
        using (var w = new BinaryWriter(ms, Encoding.UTF8, leaveOpen: true))
        {
            w.Write(tensors.Count);
            foreach (var t in tensors)
            {
                w.Write(t.Name);
                w.Write((int)t.DType);
                w.Write(t.Shape.Length);
                foreach (long d in t.Shape) w.Write(d);
                w.Write(t.Data.Length);
                w.Write(t.Data.Span);
            }
        }
        return ms.ToArray();
    }

    private static List<SafetensorsTensor> Deserialize(byte[] blob)
    {
        using var r = new BinaryReader(new MemoryStream(blob), Encoding.UTF8);
        int count = r.ReadInt32();
        var list = new List<SafetensorsTensor>(count);
        for (int i = 0; i < count; i++)
        {
            string name = r.ReadString();
            var dtype = (DType)r.ReadInt32();
            var shape = new long[r.ReadInt32()];
            for (int d = 0; d < shape.Length; d++) shape[d] = r.ReadInt64();
            list.Add(new SafetensorsTensor(name, dtype, shape, r.ReadBytes(r.ReadInt32())));
        }
        return list;
    }

    /// <summary>
    /// The resume check of batch and grad-accum: a checkpoint resumes when the micro-batch rows (batch) and the
    /// micro-batches per step over all ranks (grad-accum × ranks) are the same, whatever the number of ranks. Returns
    /// what differs ("batch 4 -> 2"; "grad_accum 1 -> 2"; on another number of ranks "grad_accum × ranks 1 × 2 -> 1 × 1
    /// (global batch 4 -> 2 rows)"), nothing when they match.
    /// </summary>
    private IEnumerable<string> GlobalBatchChanges(TrainerState state, IReadOnlyDictionary<string, string> saved)
    {
        string Old(string key) => saved.TryGetValue(key, out var v) ? TrainerStateJson.SettingDisplay(v) : "(not recorded)";
        string batch = TrainerStateJson.SettingText(Options.BatchSize);
        bool sameBatch = saved.TryGetValue("batch", out var b) && b == batch;
        if (!sameBatch) yield return $"batch {Old("batch")} -> {TrainerStateJson.SettingDisplay(batch)}";
        int? oldAccum = saved.TryGetValue("grad_accum", out var k) && int.TryParse(k, NumberStyles.Integer, CultureInfo.InvariantCulture, out int x) ? x : null;
        if (oldAccum is int accum && (long)accum * state.WorldSize == GlobalGradAccum) yield break;
        if (state.WorldSize == WorldSize || oldAccum is null)
        {
            yield return string.Create(CultureInfo.InvariantCulture, $"grad_accum {Old("grad_accum")} -> {Options.GradAccum}");
            yield break;
        }
        int oldBatch = int.TryParse(b, NumberStyles.Integer, CultureInfo.InvariantCulture, out int ob) ? ob : Options.BatchSize;
        yield return string.Create(CultureInfo.InvariantCulture,
            $"grad_accum × ranks {oldAccum} × {state.WorldSize} -> {Options.GradAccum} × {WorldSize} (global batch {(long)oldBatch * oldAccum * state.WorldSize} -> {(long)Options.BatchSize * GlobalGradAccum} rows)");
    }

    /// <summary>The log of a rank other than 0: warnings and errors only, each prefixed "rank R: ".</summary>
    private sealed class RankLogger(ILogger inner, int rank) : ILogger
    {
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => inner.BeginScope(state);
        public bool IsEnabled(LogLevel logLevel) => logLevel >= LogLevel.Warning && inner.IsEnabled(logLevel);

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            if (!IsEnabled(logLevel)) return;
            inner.Log(logLevel, eventId, state, exception, (s, e) => string.Create(CultureInfo.InvariantCulture, $"rank {rank}: {formatter(s, e)}"));
        }
    }
}
