using NativePeft.Data;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Tests.Cli;
using NativePeft.Tests.Ops;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Training;

/// <summary>
/// Full fine-tuning in bf16 mixed precision on a CUDA device against the emulator, which runs the same kernels on the
/// CPU (issue 14 item 2: on the first H200 run, `compare --device cuda` full FT reached eval loss 0.1195 where the
/// emulator reaches 0.0029 in the same mode). The emulator is the reference; what differs on the device is the GEMM
/// library (cuBLAS vs the host BLAS, both fp32 accumulation), the hardware's scheduling (races the emulator's fixed fibre
/// order cannot show, atomics' order) and nothing else. The first test localises a defect to one tensor's gradient
/// (the table it prints is the bisection: embedding, a layer's projection, a norm), the second follows the run.
/// Without a CUDA device the fixture is ignored ("no CUDA device").
/// </summary>
[TestFixture("cuda")]
[Parallelizable(ParallelScope.None)]
public class FullFineTuningDeviceParityTests(string device)
{
    /// <summary>
    /// Per-tensor bound on ‖g_device − g_emulator‖₂ / ‖g_emulator‖₂ after one forward/backward from the same weights and
    /// batch. Both compute bf16 activations with fp32 accumulation in a different summation order: outputs that round to
    /// bf16 differ by one unit of 2⁻⁸ where a sum lands near a rounding boundary, a few elements in a thousand, which
    /// moves a gradient by well under 1 % in L2 (ModelDeviceParityTests bounds fp32 per element at 1024 u32). A race, a
    /// wrong output dtype or a missed accumulation (beta) moves whole tensors: O(1).
    /// </summary>
    public const double MaxGradientRelativeError = 2e-2;

    /// <summary>Bound on the relative difference of each step's loss over <see cref="Steps"/> AdamW steps.</summary>
    public const double MaxLossRelativeDifference = 0.05;

    public const int Steps = 12;

    private GpuOps _device = null!;
    private GpuOps _emulator = null!;

    [OneTimeSetUp]
    public void SetUp()
    {
        _device = TestGpus.CreateOps(device);
        _emulator = TestGpus.CreateOps("emulator");
    }

    [OneTimeTearDown]
    public void TearDown()
    {
        _device?.Dispose();
        _emulator?.Dispose();
    }

    private static TrainingData Data() =>
        TrainingData.Builtin(BuiltinTask.Generate(BuiltinModel.TaskOptions), ByteTokenizer.Instance) with { ExactMatchProblems = null };

    private static LlamaModel Load(IOps ops)
    {
        using var ck = HfCheckpoint.Open(BuiltinModel.Require());
        return LlamaModel.Load(ck, ops, new LlamaModelOptions { ComputeDType = DType.BF16, FullFineTuning = true, Seed = 0 });
    }

    private static (double Loss, Dictionary<string, float[]> Grads) OneBackward(IOps ops, Batch batch)
    {
        using var model = Load(ops);
        model.ZeroGrad();
        double loss = model.Forward(batch.InputIds, batch.Labels, batch.Rows, batch.SeqLen);
        model.Backward();
        var grads = new Dictionary<string, float[]>();
        foreach (var (name, _, grad) in model.TrainableParameters)
        {
            var g = new float[grad.Count];
            ops.Download<float>(grad, g);
            grads[name] = g;
        }
        return (loss, grads);
    }

    private static double RelativeL2(float[] x, float[] reference)
    {
        double num = 0, den = 0;
        for (int i = 0; i < x.Length; i++)
        {
            double d = (double)x[i] - reference[i];
            num += d * d;
            den += (double)reference[i] * reference[i];
        }
        return den == 0 ? (num == 0 ? 0 : double.PositiveInfinity) : Math.Sqrt(num / den);
    }

    [Test]
    public void FirstStepGradientsMatchTheEmulatorTensorByTensor()
    {
        var data = Data();
        var batch = Batcher.For(data.Train, new BatcherOptions { BatchSize = 16, SeqLen = 24, Shuffle = false }, data.Tokenizer).Next();
        var reference = OneBackward(_emulator, batch);
        var onDevice = OneBackward(_device, batch);
        var errors = reference.Grads.Select(kv => (Name: kv.Key, Error: RelativeL2(onDevice.Grads[kv.Key], kv.Value)))
            .OrderByDescending(e => e.Error).ToList();
        TestContext.Out.WriteLine($"loss: emulator {reference.Loss:R}, {_device.Name} {onDevice.Loss:R}");
        TestContext.Out.WriteLine("relative L2 error of each gradient, worst first:");
        foreach (var (name, error) in errors) TestContext.Out.WriteLine($"  {error,12:E3}  {name}");
        Assert.That(onDevice.Loss, Is.EqualTo(reference.Loss).Within(1e-3 * Math.Abs(reference.Loss)), "loss");
        Assert.That(onDevice.Grads.Keys, Is.EquivalentTo(reference.Grads.Keys));
        var bad = errors.Where(e => !(e.Error <= MaxGradientRelativeError)).Select(e => $"{e.Name} {e.Error:E2}").ToList();
        Assert.That(bad, Is.Empty, $"gradients further than {MaxGradientRelativeError} (relative L2) from the emulator's");
    }

    [Test]
    public void StepsFollowTheEmulatorsLosses()
    {
        double[] Run(IOps ops, string output)
        {
            using var model = Load(ops);
            using var trainer = new Trainer(model, Data(), new TrainerOptions
            {
                Steps = Steps, Lr = 1e-3, BatchSize = 16, SeqLen = 24, WarmupSteps = 2, Schedule = LrScheduleKind.Cosine,
                ExactMatchSamples = 0, EvalBatches = 1, OutputDir = output, Seed = 0,
            });
            trainer.Train();
            return trainer.StepHistory.Select(s => s.Loss).ToArray();
        }
        using var dir = CliProcess.TempDir();
        var reference = Run(_emulator, dir["emulator"]);
        var onDevice = Run(_device, dir["device"]);
        for (int i = 0; i < Steps; i++)
            TestContext.Out.WriteLine($"step {i + 1,2}: emulator {reference[i]:F5}  {_device.Name} {onDevice[i]:F5}  ({(onDevice[i] - reference[i]) / reference[i]:+0.0%;-0.0%})");
        Assert.That(onDevice, Has.Length.EqualTo(Steps));
        for (int i = 0; i < Steps; i++)
            Assert.That(onDevice[i], Is.EqualTo(reference[i]).Within(MaxLossRelativeDifference * reference[i]), $"step {i + 1} loss");
    }
}
