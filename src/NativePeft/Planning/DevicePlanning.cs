using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Quantization;
using NativePeft.Runtime;

namespace NativePeft.Planning;

/// <summary>
/// The one place a run's memory plan is made from the <see cref="LlamaModelOptions"/> it loads the model with, and the
/// device pool sized from it: training (<see cref="Training.FineTune"/>, `bench --model`), generation and evaluation
/// (`generate`, `eval`).
/// </summary>
public static class DevicePlanning
{
    /// <summary>The blocksize and double quantization of a bitsandbytes checkpoint's 4-bit weights (loaded as stored), or null.</summary>
    public static (int Blocksize, bool DoubleQuant)? StoredQuantization(HfCheckpoint checkpoint)
    {
        ArgumentNullException.ThrowIfNull(checkpoint);
        if (!checkpoint.IsQuantizedCheckpoint || checkpoint.TensorNames.FirstOrDefault(checkpoint.IsQuantized) is not { } name) return null;
        var state = checkpoint.LoadQuantized(name).State;
        return (state.Blocksize, state.IsDoubleQuant);
    }

    /// <summary>
    /// The training plan of a model loaded with <paramref name="model"/>: full fine-tuning, LoRA on a dense base (BF16-stored
    /// or the compute dtype), or QLoRA on a 4-bit base (quantized on load, or a bitsandbytes checkpoint as
    /// <paramref name="stored"/>), for a batch shape and an optimizer.
    /// </summary>
    public static MemoryPlan Training(LlamaConfig config, LlamaModelOptions model, int batch, int seq, string optimizer,
        bool clipGradients = true, (int Blocksize, bool DoubleQuant)? stored = null, PlanDevice device = PlanDevice.Gpu, int worldSize = 1)
    {
        ArgumentNullException.ThrowIfNull(model);
        var method = model.FullFineTuning ? FineTuneMethod.Full
            : model.Quantization != BaseQuantization.None || stored is not null ? FineTuneMethod.Qlora : FineTuneMethod.Lora;
        if (method != FineTuneMethod.Full && model.Lora is null)
            throw new ArgumentException("a training plan needs LoRA settings or full fine-tuning", nameof(model));
        var lora = model.Lora ?? new LoraSettings();
        if (method == FineTuneMethod.Full) stored = null;
        return MemoryPlan.Compute(config, new PlanOptions
        {
            Method = method,
            Blocksize = stored?.Blocksize ?? model.Blocksize, DoubleQuant = stored?.DoubleQuant ?? model.DoubleQuant,
            QuantType = model.Quantization == BaseQuantization.Fp4 ? QuantType.Fp4 : QuantType.Nf4,
            Rank = lora.Rank, Alpha = lora.Alpha, Dropout = method == FineTuneMethod.Full ? 0 : lora.Dropout, Targets = lora.TargetModules, Batch = batch, Seq = seq,
            Recompute = model.Recompute, EmbeddingOnHost = model.EmbeddingOnHost, Optimizer = optimizer, ComputeDType = model.ComputeDType,
            BaseWeightDType = method == FineTuneMethod.Lora ? model.BaseWeightDType ?? model.ComputeDType : null,
            ClipGradients = clipGradients, CrossEntropyChunk = model.CrossEntropyChunk, Device = device, WorldSize = worldSize,
        });
    }

    /// <summary>The inference plan of a model loaded with <paramref name="model"/> (no full fine-tuning), its adapter included.</summary>
    public static InferencePlan Inference(LlamaConfig config, LlamaModelOptions model, InferencePlanOptions shape,
        (int Blocksize, bool DoubleQuant)? stored = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(shape);
        if (model.FullFineTuning) throw new ArgumentException("an inference plan is for a frozen model (no full fine-tuning)", nameof(model));
        bool q4 = model.Quantization != BaseQuantization.None || stored is not null;
        return InferencePlan.Compute(config, shape with
        {
            Quantization = !q4 ? BaseQuantization.None : model.Quantization == BaseQuantization.Fp4 ? BaseQuantization.Fp4 : BaseQuantization.Nf4,
            Blocksize = stored?.Blocksize ?? model.Blocksize, DoubleQuant = stored?.DoubleQuant ?? model.DoubleQuant,
            ComputeDType = model.ComputeDType, BaseWeightDType = q4 ? null : model.BaseWeightDType,
            LoraRank = model.Lora?.Rank, LoraDropout = model.Lora?.Dropout ?? 0, LoraTargets = model.Lora?.TargetModules ?? LoraSettings.KnownTargets,
            CrossEntropyChunk = model.CrossEntropyChunk,
        });
    }

    /// <summary>
    /// What a run may hold on <paramref name="gpu"/> and how to say it: the device's free memory now (CUDA's, or the
    /// emulator's budget less what it holds), capped by <paramref name="limit"/> (a user's limit, e.g. to share the GPU);
    /// null on the CPU (no device).
    /// </summary>
    public static (long Bytes, string Words)? Budget(IGpu? gpu, long? limit)
    {
        if (limit is <= 0) throw new ArgumentOutOfRangeException(nameof(limit), limit, "a memory limit is a positive number of bytes");
        if (gpu is null) return null;
        long free = gpu.MemoryInfo().Free;
        return limit is { } l && l < free
            ? (l, $"the memory limit ({MemoryPlan.FormatBytes(l)}; the device has {MemoryPlan.FormatBytes(free)} free)")
            : (free, $"the device's free memory ({MemoryPlan.FormatBytes(free)}{(limit is { } m ? $", under the memory limit of {MemoryPlan.FormatBytes(m)}" : "")})");
    }

    /// <summary>
    /// <paramref name="doesNotFit"/> of the run's <see cref="Budget"/> on <paramref name="gpu"/> (the plan's one-line
    /// message, or null when it fits).
    /// </summary>
    public static string? CheckFreeMemory(IGpu gpu, Func<long, string, string?> doesNotFit, long? limit = null)
    {
        ArgumentNullException.ThrowIfNull(gpu);
        ArgumentNullException.ThrowIfNull(doesNotFit);
        var (bytes, words) = Budget(gpu, limit)!.Value;
        return doesNotFit(bytes, words);
    }

    /// <summary>
    /// The device pool for a training plan on <paramref name="gpu"/> (and the other batch shapes of
    /// <paramref name="alsoFits"/>), after checking the plan against the run's <see cref="Budget"/>. Either failure — the
    /// plan exceeds the budget, or the device refuses the pool's memory (another process took it since) — is a
    /// <see cref="PlanDoesNotFitException"/> with the plan's total, what was free and the options that would fit; never the
    /// driver's raw error.
    /// </summary>
    public static DevicePool TrainingPool(IGpu gpu, MemoryPlan plan, long? limit = null, params IReadOnlyList<(int Batch, int Seq)> alsoFits)
    {
        ArgumentNullException.ThrowIfNull(plan);
        return Pool(gpu, limit, plan.DoesNotFitMessage, plan.TotalBytes, () => DevicePool.ForGpu(gpu, plan, alsoFits));
    }

    /// <summary>
    /// The device pool for an inference plan on <paramref name="gpu"/>, checked as <see cref="TrainingPool"/> is. The GPU
    /// is disposed when this throws.
    /// </summary>
    public static DevicePool InferencePool(IGpu gpu, InferencePlan plan, long? limit = null)
    {
        ArgumentNullException.ThrowIfNull(plan);
        try { return Pool(gpu, limit, plan.DoesNotFitMessage, plan.TotalBytes, () => DevicePool.ForGpu(gpu, plan)); }
        catch
        {
            gpu.Dispose();
            throw;
        }
    }

    private static DevicePool Pool(IGpu gpu, long? limit, Func<long, string, string?> doesNotFit, long planTotal, Func<DevicePool> create)
    {
        ArgumentNullException.ThrowIfNull(gpu);
        if (CheckFreeMemory(gpu, doesNotFit, limit) is { } message) throw new PlanDoesNotFitException(message);
        try { return create(); }
        catch (Exception e) when (e is OutOfMemoryException || (e is CudaException c && c.Result == CuResult.OutOfMemory))
        {
            // The plan fitted a moment ago: the device's memory went elsewhere (another process) or is fragmented.
            var (bytes, words) = Budget(gpu, limit)!.Value;
            throw new PlanDoesNotFitException((doesNotFit(bytes, words)
                ?? $"could not be reserved: plan total {MemoryPlan.FormatBytes(planTotal)}, {words} (fragmented, or taken by another process)")
                + $" [{e.Message}]", e);
        }
    }
}

/// <summary>A memory plan exceeds the device's free memory; the message names the options that would make it fit.</summary>
public sealed class PlanDoesNotFitException(string message, Exception? inner = null) : Exception(message, inner);
