using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Optim;
using NativePeft.Planning;
using NativePeft.Runtime;
using NativePeft.Tests.Ops;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Planning;

/// <summary>
/// The memory pool (<see cref="DevicePool"/>) sized up front from the <see cref="MemoryPlan"/>: a tiny model trained two
/// steps with LoRA (bf16 base), QLoRA and full fine-tuning on the CPU, the emulator and CUDA (where present), every
/// tensor coming from the pool's arenas. The pool's peak (requested bytes) must equal the plan to the byte, each arena's
/// reservation must equal the aligned plan's category sum, and the tensors the pool counted into each arena (rounded
/// to its alignment, one by one as they came) must fill that reservation exactly — no more, no less — with no
/// fragmentation in training. Evaluation at a smaller shape and greedy generation fit afterwards; a request past a
/// reservation fails with the arena, its size, the request and the plan total.
/// </summary>
[TestFixture("cpu")]
[TestFixture("emulator")]
[TestFixture("cuda")]
[Parallelizable(ParallelScope.None)]
public class DevicePoolTests(string device)
{
    /// <summary>As in <see cref="MemoryPlanExactnessTests"/>: 2 layers, hidden 64, vocab 1600 (paged state on the GPU).</summary>
    private static readonly LlamaConfig Config = new()
    {
        HiddenSize = 64, IntermediateSize = 128, NumAttentionHeads = 4, NumKeyValueHeads = 2, HeadDim = 16,
        NumHiddenLayers = 2, VocabSize = 1600, MaxPositionEmbeddings = 64, RmsNormEps = 1e-5, RopeTheta = 10000,
    };

    private const int B = 2, T = 5;

    public static IEnumerable<TestCaseData> Cases()
    {
        var o = new PlanOptions { Batch = B, Seq = T, Rank = 4, Alpha = 8, CrossEntropyChunk = 512 };
        TestCaseData Case(string name, PlanOptions options) => new TestCaseData(options).SetArgDisplayNames(name);
        yield return Case("lora-bf16base", o with { Method = FineTuneMethod.Lora });
        yield return Case("qlora-nf4-dq", o with { Method = FineTuneMethod.Qlora });
        yield return Case("full-adamw", o with { Method = FineTuneMethod.Full });
        yield return Case("full-paged-adamw8bit-recompute", o with { Method = FineTuneMethod.Full, Optimizer = "paged-adamw8bit", Recompute = true });
        // Mixed precision (GPU devices only): bf16 activations and working copies, fp32 adapters, masters and statistics.
        yield return Case("lora-bf16-compute", o with { Method = FineTuneMethod.Lora, ComputeDType = DType.BF16 });
        yield return Case("qlora-nf4-dq-bf16-compute-recompute", o with { Method = FineTuneMethod.Qlora, ComputeDType = DType.BF16, Recompute = true });
        yield return Case("full-bf16-compute", o with { Method = FineTuneMethod.Full, ComputeDType = DType.BF16 });
    }

    private PlanDevice Device => device == "cpu" ? PlanDevice.Cpu : PlanDevice.Gpu;

    private int Alignment => device == "cpu" ? DevicePool.HostAlignment : DevicePool.GpuAlignment;

    private (IOps Ops, DevicePool Pool) Create(MemoryPlan plan, params IReadOnlyList<(int, int)> alsoFits)
    {
        if (device == "cpu")
        {
            var hostPool = DevicePool.ForHost(plan, alsoFits);
            return (new CpuOps(hostPool), hostPool);
        }
        IGpu gpu;
        if (device == "emulator") gpu = TestGpus.CreateEmulated();
        else
        {
            var cuda = TestGpus.TryCreateCuda(out string reason);
            if (cuda is null) Assert.Ignore("no CUDA device: " + reason);
            gpu = cuda!;
        }
        var pool = DevicePool.ForGpu(gpu, plan, alsoFits);
        return (new GpuOps(gpu, ownsGpu: true, memory: pool), pool);
    }

    private static (int[] Ids, int[] Labels) Batch(int batch, int seq, int seed = 17)
    {
        var rng = new Random(seed);
        var ids = new int[batch * seq];
        for (int i = 0; i < ids.Length; i++) ids[i] = rng.Next(Config.VocabSize);
        var labels = (int[])ids.Clone();
        labels[0] = -100;
        return (ids, labels);
    }

    private static void Step(LlamaModel model, IOps ops, IOptimizer optimizer, PlanOptions options)
    {
        var (ids, labels) = Batch(options.Batch, options.Seq);
        model.ZeroGrad();
        double loss = model.Forward(ids, labels, options.Batch, options.Seq);
        Assert.That(double.IsFinite(loss), Is.True);
        model.Backward();
        double scale = GradientClipping.ClipCoefficient(GradientClipping.GlobalNorm(ops, model.TrainableParameters.Select(p => p.Grad)), 1.0);
        optimizer.Step(model.TrainableParameters, 1e-3, scale);
    }

    [TestCaseSource(nameof(Cases))]
    public void ThePoolsPeakIsThePlanAndEveryArenaIsFilledExactly(PlanOptions options)
    {
        if (device == "cpu" && options.ComputeDType == DType.BF16) Assert.Ignore("BF16 compute runs on GPU devices only (the CPU reference is fp32)");
        options = options with { Device = Device };
        var plan = MemoryPlan.Compute(Config, options);
        var aligned = plan.Aligned(Alignment);
        var (ops, pool) = Create(plan);
        using var _ = ops;
        Assert.Multiple(() =>
        {
            Assert.That(pool.Arena(MemoryRegion.Persistent).ReservedBytes, Is.EqualTo(aligned.PersistentArenaBytes));
            Assert.That(pool.Arena(MemoryRegion.RopeTables).ReservedBytes, Is.EqualTo(aligned.RopeArenaBytes));
            Assert.That(pool.Arena(MemoryRegion.Transient).ReservedBytes, Is.EqualTo(aligned.TransientArenaBytes));
            // Rounding adds less than one alignment unit per tensor, so the reservation is within [plan, plan + slack).
            Assert.That(pool.ReservedBytes, Is.GreaterThanOrEqualTo(plan.TotalBytes));
            Assert.That(plan.PersistentArenaBytes + plan.RopeArenaBytes + plan.TransientArenaBytes, Is.EqualTo(plan.TotalBytes));
            using var json = System.Text.Json.JsonDocument.Parse(plan.ToJson());
            Assert.That(json.RootElement.GetProperty("pool_persistent_bytes").GetInt64(), Is.EqualTo(pool.Arena(MemoryRegion.Persistent).ReservedBytes), "estimate --json");
            Assert.That(json.RootElement.GetProperty("pool_transient_bytes").GetInt64(), Is.EqualTo(pool.Arena(MemoryRegion.Transient).ReservedBytes), "estimate --json");
            Assert.That(json.RootElement.GetProperty("pool_alignment").GetInt32(), Is.EqualTo(pool.Alignment));
        });

        using var model = LlamaModel.CreateRandom(Config, ops, options.ToModelOptions(seed: 3), weightSeed: 5, std: 0.05);
        using var optimizer = OptimizerFactory.Create(options.Optimizer, ops);
        Step(model, ops, optimizer, options);
        Assert.That(pool.PeakAllocatedBytes, Is.EqualTo(plan.FirstStepPeakBytes), "pool peak over the first step (requested bytes)");
        Step(model, ops, optimizer, options);
        Assert.That(pool.PeakAllocatedBytes, Is.EqualTo(plan.TotalBytes), "pool peak in a steady step (requested bytes)");
        Assert.Multiple(() =>
        {
            foreach (var a in pool.Arenas)
            {
                Assert.That(a.PeakInUseBytes, Is.EqualTo(a.ReservedBytes), $"{a.Name}: the tensors it held at its peak fill the reservation exactly");
                Assert.That(a.HighWaterBytes, Is.EqualTo(a.PeakInUseBytes), $"{a.Name}: no fragmentation in training");
            }
            Assert.That(pool.Arena(MemoryRegion.Persistent).InUseBytes, Is.EqualTo(aligned.PersistentArenaBytes), "persistent: all of it held between steps");
            Assert.That(pool.Arena(MemoryRegion.Transient).InUseBytes, Is.EqualTo(aligned.ActivationBytes), "transient: the activations between steps");
        });

        // Evaluation at a smaller shape (B=1, T-1: activations reallocated) and greedy generation (B=1, growing T) fit.
        model.Dropout.Training = false;
        var (ids, labels) = Batch(1, T - 1, seed: 4);
        Assert.That(double.IsFinite(model.Forward(ids, labels, 1, T - 1)), Is.True);
        // Generation up to T = 2 (its F32 logits [T, vocab] come from the transient arena too; a longer generation
        // needs a pool sized for it: ALargerEvaluationShapeFitsWhenThePoolIsSizedForIt).
        var generated = Trainer.GreedyGenerate(model, [1], maxNewTokens: 2, eosId: null);
        Assert.That(generated, Has.Length.EqualTo(2));
        Assert.That(generated, Is.All.InRange(0, Config.VocabSize - 1));
        foreach (var a in pool.Arenas)
            Assert.That(a.HighWaterBytes, Is.LessThanOrEqualTo(a.ReservedBytes), $"{a.Name} after evaluation");
        Assert.That(pool.PeakAllocatedBytes, Is.EqualTo(plan.TotalBytes), "evaluation stays within the training peak");
    }

    /// <summary>
    /// The persistent arena against arithmetic done by hand, not against the plan it was sized from (issue 13 item 4):
    /// full fine-tuning in fp32 with AdamW holds, for each of the P parameters, the weight, its gradient and the two
    /// moments — 16·P bytes. P for <see cref="Config"/> (untied): embed 1600·64 = 102400; per layer q 64·64 = 4096,
    /// k and v 64·32 = 2048 each, o 4096, gate, up and down 64·128 = 8192 each, two norms 64 each = 36992, so 73984 for
    /// two layers; the final norm 64; lm_head 102400: P = 278848 and 16·P = 4461568 bytes. Every tensor's bytes are a
    /// multiple of 256, so no alignment padding on any device. A plan that forgot a moment or double-counted gradients
    /// fails here even when the pool agrees with the plan.
    /// </summary>
    [Test]
    public void TheFullFineTuningPersistentArenaIsWeightsGradientsAndTwoMomentsByHand()
    {
        const long P = 102400 + 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192 + 2 * 64) + 64 + 102400;
        Assert.That(P, Is.EqualTo(278848));
        var options = new PlanOptions { Batch = B, Seq = T, CrossEntropyChunk = 512, Method = FineTuneMethod.Full, Device = Device };
        var plan = MemoryPlan.Compute(Config, options);
        var (ops, pool) = Create(plan);
        using var _ = ops;
        using var model = LlamaModel.CreateRandom(Config, ops, options.ToModelOptions(seed: 3), weightSeed: 5, std: 0.05);
        using var optimizer = OptimizerFactory.Create(options.Optimizer, ops);
        Step(model, ops, optimizer, options);
        Assert.That(model.TrainableParameters.Sum(p => p.Param.Count), Is.EqualTo(P), "the model's parameters");
        Assert.That(pool.Arena(MemoryRegion.Persistent).InUseBytes, Is.EqualTo(16 * P), "held between steps: weights, gradients, m, v");
        Assert.That(pool.Arena(MemoryRegion.Persistent).ReservedBytes, Is.EqualTo(16 * P), "reserved");
    }

    [Test]
    public void ARequestPastAReservationFailsNamingTheArenaTheRequestAndThePlan()
    {
        var options = new PlanOptions { Method = FineTuneMethod.Lora, Batch = B, Seq = T, Rank = 4, CrossEntropyChunk = 512, Device = Device };
        var plan = MemoryPlan.Compute(Config, options);
        var (ops, pool) = Create(plan);
        using var _ = ops;
        using var model = LlamaModel.CreateRandom(Config, ops, options.ToModelOptions(seed: 3), weightSeed: 5);
        using var optimizer = OptimizerFactory.Create(options.Optimizer, ops);
        Step(model, ops, optimizer, options);
        long reserved = pool.Arena(MemoryRegion.Transient).ReservedBytes;

        // The persistent arena is full once optimizer state exists: one more byte does not fit.
        var e1 = Assert.Throws<OutOfMemoryException>(() => ops.Memory.Allocate(MemoryRegion.Persistent, DType.U8, 1))!;
        Assert.That(e1.Message, Does.Contain("persistent").And.Contain("a request of 1 bytes")
            .And.Contain($"{pool.Arena(MemoryRegion.Persistent).ReservedBytes} bytes").And.Contain($"total is {plan.TotalBytes} bytes"));

        // A transient request larger than what is free between steps.
        int elements = checked((int)(reserved / 4));
        var e2 = Assert.Throws<OutOfMemoryException>(() => ops.Memory.Allocate(DType.F32, elements))!;
        Assert.That(e2.Message, Does.Contain("transient").And.Contain($"a request of {elements * 4L} bytes")
            .And.Contain($"arena of {reserved} bytes").And.Contain($"total is {plan.TotalBytes} bytes"));

        // A forward at a larger shape than planned (N = 20 > 10 tokens) needs more activations than reserved.
        var (ids, labels) = Batch(4, T);
        Assert.Throws<OutOfMemoryException>(() => model.Forward(ids, labels, 4, T));
        Assert.That(pool.AllocatedBytes, Is.EqualTo(plan.TotalBytes - plan.ActivationBytes - plan.TransientWorkspaceBytes),
            "the failed forward released what it had allocated");
        // What was free is still usable: training at the planned shape goes on, at the plan's peak. (The failed forward's
        // partial allocations may have gone a few bytes past the plan inside the arenas' alignment slack: not counted.)
        pool.ResetPeak();
        Step(model, ops, optimizer, options);
        Assert.That(pool.PeakAllocatedBytes, Is.EqualTo(plan.TotalBytes));
    }

    [Test]
    public void ALargerEvaluationShapeFitsWhenThePoolIsSizedForIt()
    {
        var options = new PlanOptions { Method = FineTuneMethod.Qlora, Batch = B, Seq = T, Rank = 4, CrossEntropyChunk = 512, Device = Device };
        var plan = MemoryPlan.Compute(Config, options);
        const int evalBatch = 1, evalSeq = 70; // longer than training and than the 64 RoPE rows: both arenas must grow
        var (ops, pool) = Create(plan, (evalBatch, evalSeq));
        using var _ = ops;
        var big = plan.With(o => o with { Batch = evalBatch, Seq = evalSeq }).Aligned(Alignment);
        Assert.Multiple(() =>
        {
            Assert.That(pool.Arena(MemoryRegion.RopeTables).ReservedBytes, Is.EqualTo(big.RopeArenaBytes));
            Assert.That(pool.Arena(MemoryRegion.Transient).ReservedBytes,
                Is.EqualTo(big.ActivationBytes + Math.Max(big.TransientWorkspaceBytes, MemoryPlan.TensorBytes(DType.F32, evalSeq * Config.VocabSize, Alignment))));
            Assert.That(pool.Arena(MemoryRegion.Persistent).ReservedBytes, Is.EqualTo(plan.Aligned(Alignment).PersistentArenaBytes), "parameters do not depend on the shape");
        });
        using var model = LlamaModel.CreateRandom(Config, ops, options.ToModelOptions(seed: 3), weightSeed: 5);
        using var optimizer = OptimizerFactory.Create(options.Optimizer, ops);
        Step(model, ops, optimizer, options);
        var (ids, labels) = Batch(evalBatch, evalSeq);
        Assert.That(double.IsFinite(model.Forward(ids, labels, evalBatch, evalSeq)), Is.True);
        model.Dropout.Training = false;
        var generated = Trainer.GreedyGenerate(model, ids.Take(evalSeq - 10).ToList(), maxNewTokens: 10, eosId: null); // T = 60 … 69
        Assert.That(generated, Has.Length.EqualTo(10));
        model.Dropout.Training = true;
        Step(model, ops, optimizer, options); // and training at the planned shape afterwards
        foreach (var a in pool.Arenas)
            Assert.That(a.HighWaterBytes, Is.LessThanOrEqualTo(a.ReservedBytes), a.Name);
    }

    [Test]
    public void AnEvaluationWithNoMoreTokensThanTrainingFits()
    {
        // B = 2, T = 40: an evaluation of one sequence of 80 tokens needs 80 RoPE rows (training: 64).
        var options = new PlanOptions { Method = FineTuneMethod.Lora, Batch = 2, Seq = 40, Rank = 4, CrossEntropyChunk = 512, Device = Device };
        var plan = MemoryPlan.Compute(Config, options);
        var (ops, pool) = Create(plan);
        using var _ = ops;
        var aligned = plan.Aligned(Alignment);
        var oneSequence = plan.With(o => o with { Batch = 1, Seq = 80 }).Aligned(Alignment);
        Assert.That(oneSequence.RopeArenaBytes, Is.GreaterThan(aligned.RopeArenaBytes));
        Assert.That(pool.Arena(MemoryRegion.RopeTables).ReservedBytes, Is.EqualTo(oneSequence.RopeArenaBytes));
        Assert.That(pool.Arena(MemoryRegion.Transient).ReservedBytes, Is.EqualTo(aligned.TransientArenaBytes));
        using var model = LlamaModel.CreateRandom(Config, ops, options.ToModelOptions(seed: 3), weightSeed: 5);
        using var optimizer = OptimizerFactory.Create(options.Optimizer, ops);
        Step(model, ops, optimizer, options);
        Assert.That(pool.PeakAllocatedBytes, Is.EqualTo(plan.FirstStepPeakBytes));
        model.Dropout.Training = false;
        foreach (var (b, t) in new[] { (1, 80), (4, 20), (1, 7) })
        {
            var (ids, labels) = Batch(b, t);
            Assert.That(double.IsFinite(model.Forward(ids, labels, b, t)), Is.True, $"{b}×{t}");
        }
        model.Dropout.Training = true;
        Step(model, ops, optimizer, options);
        foreach (var a in pool.Arenas)
            Assert.That(a.HighWaterBytes, Is.LessThanOrEqualTo(a.ReservedBytes), a.Name);
        Assert.That(pool.Arena(MemoryRegion.Transient).PeakInUseBytes, Is.EqualTo(aligned.TransientArenaBytes), "training still peaks at the plan");
    }

    [Test]
    public void AlignedPlanRoundsEveryTensorUp()
    {
        // Hand-computed: lora_A of q_proj [4, 64] F32 is 1024 bytes (a multiple of 256); a [4] F32 tensor is 16 bytes -> 256.
        Assert.That(MemoryPlan.TensorBytes(DType.F32, 4 * 64, 256), Is.EqualTo(1024));
        Assert.That(MemoryPlan.TensorBytes(DType.F32, 4, 256), Is.EqualTo(256));
        Assert.That(MemoryPlan.TensorBytes(DType.U8, 0, 64), Is.EqualTo(64), "an empty tensor still takes one unit");
        var plan = MemoryPlan.Compute(Config, new PlanOptions { Method = FineTuneMethod.Full, Batch = B, Seq = T, Device = Device });
        var aligned = plan.Aligned(256);
        // Full fine-tuning, per layer: 2 norms [64] F32 (256 B -> 256) for weight and gradient; so the norms add nothing,
        // and every projection and the embeddings are multiples of 256 already: base weights and gradients are unchanged.
        Assert.That(aligned.BaseWeightBytes, Is.EqualTo(plan.BaseWeightBytes));
        // Activations: ids, labels, positions I32 [10] (40 B -> 256 each): 3·216 bytes of padding, among others.
        Assert.That(aligned.ActivationBytes, Is.GreaterThanOrEqualTo(plan.ActivationBytes + 3 * 216));
        Assert.That(aligned.Aligned(1).TotalBytes, Is.EqualTo(plan.TotalBytes));
    }
}
