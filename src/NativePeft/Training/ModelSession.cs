using NativePeft.Data;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Ops;
using NativePeft.Planning;
using NativePeft.Runtime;

namespace NativePeft.Training;

/// <summary>
/// A model opened on a device: the one way every run gets there (<see cref="FineTune"/>, `generate`, `eval`). In order:
/// <see cref="Open"/> reads the checkpoint (and the tokenizer, when asked), <see cref="OpenDevice"/> opens the device,
/// <see cref="PlanTraining"/> or <see cref="PlanInference"/> makes the memory plan and the device pool sized from it
/// (refusing a plan that exceeds the device's free memory or the limit), and <see cref="LoadModel"/> creates the ops
/// and loads the <see cref="LlamaModel"/> (with the adapter given to <see cref="Open"/>, if any). The caller decides the
/// <see cref="LlamaModelOptions"/> and the plan's shape between the steps (from the config, the tokenizer, its data).
/// <para>
/// The session owns what it opened and <see cref="Dispose"/> releases it in reverse order: the model, the ops (which
/// own the pool and the device), or the pool and the device when no ops were made yet, then the checkpoint. A step
/// that throws disposes the whole session first, so a failed open holds no device memory. Every refusal is an
/// <see cref="OptionException"/> naming the setting: "Model" (the checkpoint or tokenizer files, as
/// <see cref="IsModelFileError"/>), "Device" (unavailable, or the plan does not fit its free memory), "DeviceMemory"
/// (the plan exceeds the given limit), "Rank" (a LoRA rank larger than a targeted projection) or "Adapter" (the same,
/// for the adapter's rank); the detail starts with the value, as the front end shows it.
/// </para>
/// </summary>
public sealed class ModelSession : IDisposable
{
    private readonly string _modelName;
    private string _device = "cpu";
    private long? _deviceMemory;
    private bool _disposed;

    private ModelSession(string modelDirectory, string modelName, HfCheckpoint checkpoint, PeftAdapter? adapter)
    {
        ModelDirectory = modelDirectory;
        _modelName = modelName;
        Checkpoint = checkpoint;
        Adapter = adapter;
    }

    /// <summary>The model folder.</summary>
    public string ModelDirectory { get; }
    public HfCheckpoint Checkpoint { get; }
    public LlamaConfig Config => Checkpoint.Config;
    /// <summary>The folder's tokenizer (an <see cref="IdsOnlyTokenizer"/> when it has no tokenizer files), or null when not asked for.</summary>
    public ITokenizer? Tokenizer { get; private set; }
    /// <summary>The adapter <see cref="LoadModel"/> applies, or null.</summary>
    public PeftAdapter? Adapter { get; }
    /// <summary>The device (null on the CPU, or before <see cref="OpenDevice"/>).</summary>
    public IGpu? Gpu { get; private set; }
    /// <summary>The device memory pool sized from the plan (GPU devices), or null.</summary>
    public DevicePool? Pool { get; private set; }
    /// <summary>The training plan the pool was sized from (<see cref="PlanTraining"/> on a GPU device), or null.</summary>
    public MemoryPlan? TrainingPlan { get; private set; }
    /// <summary>The inference plan the pool was sized from (<see cref="PlanInference"/> on a GPU device), or null.</summary>
    public InferencePlan? InferencePlan { get; private set; }
    /// <summary>The ops the model runs on (<see cref="LoadModel"/> makes them), or null before.</summary>
    public IOps? Ops { get; private set; }
    /// <summary>The model (<see cref="LoadModel"/>), or null before.</summary>
    public LlamaModel? Model { get; private set; }
    /// <summary>The device the ops run on ("cpu", or the GPU's name), for reports.</summary>
    public string DeviceName => Gpu?.Properties.Name ?? "cpu";

    /// <summary>
    /// The errors of reading a model folder's files (a missing or malformed config.json, safetensors, a bitsandbytes
    /// state, I/O and permissions): the one filter every command uses to name the model for them.
    /// </summary>
    public static bool IsModelFileError(Exception e) =>
        e is HfCheckpointException or LlamaConfigException or SafetensorsException or IOException or UnauthorizedAccessException;

    /// <summary>
    /// Opens the checkpoint in <paramref name="modelDirectory"/> and, with <paramref name="withTokenizer"/>, its tokenizer
    /// (checked against the model's vocab_size). <paramref name="modelName"/> is how errors name the model (the user's
    /// argument; the folder by default); <paramref name="adapter"/> is applied by <see cref="LoadModel"/>.
    /// </summary>
    public static ModelSession Open(string modelDirectory, bool withTokenizer = false, string? modelName = null, PeftAdapter? adapter = null)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(modelDirectory);
        string name = modelName ?? modelDirectory;
        HfCheckpoint checkpoint;
        try { checkpoint = HfCheckpoint.Open(modelDirectory); }
        catch (Exception e) when (IsModelFileError(e)) { throw new OptionException("Model", $"{name}: {e.Message}", e); }
        var session = new ModelSession(modelDirectory, name, checkpoint, adapter);
        if (withTokenizer) session.Step(session.LoadTokenizer);
        return session;
    }

    private void LoadTokenizer()
    {
        int vocab = Config.VocabSize;
        ITokenizer tokenizer;
        try { tokenizer = TokenizerLoader.ForModel(ModelDirectory, vocab); }
        catch (Exception e) when (e is IOException or InvalidDataException or NotSupportedException)
        {
            throw new OptionException("Model", $"{_modelName}: tokenizer: {e.Message}", e);
        }
        if (tokenizer.VocabSize > vocab)
            throw new OptionException("Model", $"{_modelName}: the tokenizer has {tokenizer.VocabSize} ids, the model's vocab_size is {vocab}");
        Tokenizer = tokenizer;
    }

    /// <summary>
    /// Opens <paramref name="device"/> ("cpu": none; "auto", "cuda" or "emulator": <see cref="GpuFactory"/>);
    /// <paramref name="deviceMemory"/> caps what the plan may take of it (null: its free memory).
    /// </summary>
    public void OpenDevice(string device, long? deviceMemory = null, int deviceOrdinal = 0) => Step(() =>
    {
        ArgumentNullException.ThrowIfNull(device);
        if (Gpu is not null || Ops is not null) throw new InvalidOperationException("the device is already open");
        _device = device;
        _deviceMemory = deviceMemory;
        if (device != "cpu") Gpu = GpuFactory.TryCreate(device, out var reason, deviceOrdinal) ?? throw new OptionException("Device", $"{device}: {reason}");
    });

    /// <summary>
    /// On a GPU device: the training plan of <paramref name="model"/> for a batch shape and optimizer (a bitsandbytes
    /// checkpoint planned 4-bit as stored) and the pool sized from it, also fitting the shapes of
    /// <paramref name="alsoFits"/>. On the CPU only the LoRA rank is checked. <paramref name="what"/> names the run in
    /// the refusal ("the run exceeds …").
    /// </summary>
    public MemoryPlan? PlanTraining(LlamaModelOptions model, int batch, int seq, string optimizer,
        IReadOnlyList<(int Batch, int Seq)>? alsoFits = null, string what = "run", int worldSize = 1) => Step(() =>
    {
        ArgumentNullException.ThrowIfNull(model);
        CheckRank(model);
        if (Gpu is null) return null;
        var stored = model.FullFineTuning ? null : StoredQuantization();
        // The trainer computes the global norm every step (grad_norm), clipping or not.
        var plan = DevicePlanning.Training(Config, model, batch, seq, optimizer, clipGradients: true, stored: stored, worldSize: worldSize);
        Pool = Fit(what, () => DevicePlanning.TrainingPool(Gpu, plan, _deviceMemory, alsoFits ?? []));
        TrainingPlan = plan;
        return plan;
    });

    /// <summary>On a GPU device: the inference plan of <paramref name="model"/> for <paramref name="shape"/> and the pool sized from it; see <see cref="PlanTraining"/>.</summary>
    public InferencePlan? PlanInference(LlamaModelOptions model, InferencePlanOptions shape, string what) => Step(() =>
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(shape);
        CheckRank(model);
        if (Gpu is null) return null;
        var plan = DevicePlanning.Inference(Config, model, shape, StoredQuantization());
        Pool = Fit(what, () => DevicePlanning.InferencePool(Gpu, plan, _deviceMemory));
        InferencePlan = plan;
        return plan;
    });

    /// <summary>
    /// Makes the ops (<see cref="CpuOps"/>, or <see cref="GpuOps"/> on the device and its pool), loads the model with
    /// <paramref name="model"/> and applies the adapter. An adapter whose tensors do not fit the model throws its
    /// <see cref="PeftAdapterException"/> (after disposing the session).
    /// </summary>
    public LlamaModel LoadModel(LlamaModelOptions model) => Step(() =>
    {
        ArgumentNullException.ThrowIfNull(model);
        if (Ops is not null) throw new InvalidOperationException("the model is already loaded");
        CheckRank(model);
        Ops = Gpu is null ? new CpuOps() : new GpuOps(Gpu, ownsGpu: true, memory: Pool);
        try { Model = LlamaModel.Load(Checkpoint, Ops, model); }
        catch (Exception e) when (IsModelFileError(e)) { throw new OptionException("Model", $"{_modelName}: {e.Message}", e); }
        Adapter?.ApplyTo(Model);
        return Model;
    });

    private (int Blocksize, bool DoubleQuant)? StoredQuantization()
    {
        try { return DevicePlanning.StoredQuantization(Checkpoint); }
        catch (Exception e) when (IsModelFileError(e)) { throw new OptionException("Model", $"{_modelName}: {e.Message}", e); }
    }

    /// <summary>A LoRA rank larger than a targeted projection: "Adapter" when it is the adapter's, else "Rank".</summary>
    private void CheckRank(LlamaModelOptions model)
    {
        if (model.FullFineTuning || model.Lora?.RankProblem(Config) is not { } problem) return;
        throw Adapter is not null ? new OptionException("Adapter", problem) : new OptionException("Rank", $"{model.Lora.Rank}: {problem}");
    }

    /// <summary>The pool, or the refusal naming the limit in force (DeviceMemory when given, else Device).</summary>
    private DevicePool Fit(string what, Func<DevicePool> create)
    {
        try { return create(); }
        catch (PlanDoesNotFitException e)
        {
            throw _deviceMemory is { } limit
                ? new OptionException("DeviceMemory", $"{MemoryPlan.FormatBytes(limit)}: the {what} {e.Message}", e)
                : new OptionException("Device", $"{_device}: the {what} {e.Message}", e);
        }
    }

    /// <summary>Runs a step; when it throws, the session is disposed before the exception leaves.</summary>
    private void Step(Action step) => Step(() => { step(); return 0; });

    private T Step<T>(Func<T> step)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        try { return step(); }
        catch
        {
            Dispose();
            throw;
        }
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        Model?.Dispose();
        if (Ops is not null) Ops.Dispose(); // it owns the pool and the device
        else
        {
            Pool?.Dispose();
            Gpu?.Dispose();
        }
        Checkpoint.Dispose();
    }
}
