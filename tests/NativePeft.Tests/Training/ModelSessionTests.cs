using NativePeft.Inference;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Planning;
using NativePeft.Runtime;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Training;

/// <summary>
/// <see cref="ModelSession"/>, the one way a run opens a model on a device: it owns the device, the pool, the ops and
/// the model, releases them on <see cref="ModelSession.Dispose"/>, and releases them too when a step fails half way
/// (EmulatedGpu.OpenCount counts the emulated devices not yet disposed).
/// </summary>
[Parallelizable(ParallelScope.None)]
public class ModelSessionTests
{
    private static string Builtin => BuiltinModel.Require();

    private static readonly InferencePlanOptions Generate = new() { Mode = InferenceMode.Generate, PromptTokens = 8, MaxNewTokens = 8 };

    [Test]
    public void APlanThatDoesNotFitReleasesTheDevice()
    {
        int before = EmulatedGpu.OpenCount;
        var session = ModelSession.Open(Builtin, withTokenizer: true);
        session.OpenDevice("emulator", deviceMemory: 64 * 1024);
        Assert.That(EmulatedGpu.OpenCount, Is.EqualTo(before + 1), "the session opened an emulated device");
        var e = Assert.Throws<OptionException>(() => session.PlanInference(new LlamaModelOptions(), Generate, "generation"))!;
        Assert.That(e.Option, Is.EqualTo("DeviceMemory"), "a limit was given: the limit is what the plan exceeds");
        Assert.That(e.Detail, Does.StartWith("64.0 KiB: the generation exceeds the memory limit"));
        Assert.That(EmulatedGpu.OpenCount, Is.EqualTo(before), "the failed step disposed the device");
        Assert.Throws<ObjectDisposedException>(() => session.LoadModel(new LlamaModelOptions()), "a failed session is closed");
        session.Dispose(); // idempotent
        Assert.That(EmulatedGpu.OpenCount, Is.EqualTo(before));
    }

    [Test]
    public void DisposeReleasesTheModelThePoolAndTheDevice()
    {
        int before = EmulatedGpu.OpenCount;
        using (var session = ModelSession.Open(Builtin))
        {
            session.OpenDevice("emulator");
            var plan = session.PlanInference(new LlamaModelOptions(), Generate, "generation");
            Assert.That(plan, Is.Not.Null);
            Assert.That(session.Pool, Is.Not.Null);
            session.LoadModel(new LlamaModelOptions());
            Assert.That(session.Ops!.Memory, Is.SameAs(session.Pool), "the model's bytes come from the plan's pool");
            Assert.That(session.Pool!.PeakAllocatedBytes, Is.GreaterThan(0).And.LessThanOrEqualTo(plan!.TotalBytes));
            Assert.That(session.DeviceName, Is.Not.EqualTo("cpu"));
            Assert.That(EmulatedGpu.OpenCount, Is.EqualTo(before + 1));
        }
        Assert.That(EmulatedGpu.OpenCount, Is.EqualTo(before), "Dispose released the device");
    }

    [Test]
    public void TheCpuNeedsNoPlanAndNoDevice()
    {
        using var session = ModelSession.Open(Builtin, withTokenizer: true);
        session.OpenDevice("cpu");
        Assert.That(session.PlanInference(new LlamaModelOptions(), Generate, "generation"), Is.Null);
        var model = session.LoadModel(new LlamaModelOptions());
        Assert.That(session.Gpu, Is.Null);
        Assert.That(session.Pool, Is.Null);
        Assert.That(session.DeviceName, Is.EqualTo("cpu"));
        Assert.That(session.Tokenizer, Is.Not.Null);
        Assert.That(double.IsFinite(model.Forward([1, 2, 3, 4], [1, 2, 3, 4], 1, 4)), "the loaded model runs");
    }

    [Test]
    public void ARankLargerThanAProjectionNamesTheRankOrTheAdapter()
    {
        using var probe = ModelSession.Open(Builtin);
        int hidden = probe.Config.HiddenSize;
        var tooLarge = new LlamaModelOptions { Lora = new LoraSettings { Rank = 4 * hidden, TargetModules = ["q_proj"] } };

        var session = ModelSession.Open(Builtin);
        session.OpenDevice("cpu");
        var e = Assert.Throws<OptionException>(() => session.PlanTraining(tooLarge, 1, 8, "adamw"))!;
        Assert.That(e.Option, Is.EqualTo("Rank"));
        Assert.That(e.Detail, Does.StartWith($"{4 * hidden}: r (LoRA rank) {4 * hidden} is larger than min(in, out) = "));

        // Built from the model's own LoRA (rank 2), then asked to load with a rank the model cannot take: the adapter's fault.
        using var ops = new NativePeft.Ops.CpuOps();
        using var small = LlamaModel.Load(probe.Checkpoint, ops, new LlamaModelOptions { Lora = new LoraSettings { Rank = 2, TargetModules = ["q_proj"] } });
        var adapter = PeftAdapter.FromModel(small, null);
        var withAdapter = ModelSession.Open(Builtin, adapter: adapter);
        var a = Assert.Throws<OptionException>(() => withAdapter.LoadModel(tooLarge))!;
        Assert.That(a.Option, Is.EqualTo("Adapter"));
        Assert.That(a.Detail, Does.StartWith($"r (LoRA rank) {4 * hidden} is larger"));
    }

    [Test]
    public void AFolderThatIsNotAModelNamesTheModel()
    {
        string dir = Path.Combine(Path.GetTempPath(), "no-model-" + Guid.NewGuid());
        Directory.CreateDirectory(dir);
        try
        {
            var e = Assert.Throws<OptionException>(() => ModelSession.Open(dir, modelName: "my-model"))!;
            Assert.That(e.Option, Is.EqualTo("Model"));
            Assert.That(e.Detail, Does.StartWith("my-model: "));
            Assert.That(ModelSession.IsModelFileError(e.InnerException!), "the file error is kept as the cause");
        }
        finally { Directory.Delete(dir, true); }
    }

    [Test]
    public void FineTuneReleasesTheDeviceWhenThePlanDoesNotFit()
    {
        int before = EmulatedGpu.OpenCount;
        var e = Assert.Throws<FineTuneException>(() => FineTune.Create(new FineTuneOptions
        {
            Model = BuiltinModel.Name, Data = "builtin", Device = "emulator", DeviceMemory = 64 * 1024, Steps = 1,
        }))!;
        Assert.That(e.Option, Is.EqualTo(nameof(FineTuneOptions.DeviceMemory)));
        Assert.That(e.Detail, Does.StartWith("64.0 KiB: the run exceeds the memory limit"));
        Assert.That(EmulatedGpu.OpenCount, Is.EqualTo(before));
    }
}
