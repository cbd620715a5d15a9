using NativePeft.IO;
using NativePeft.Ops;

namespace NativePeft.Optim;

/// <summary>
/// An optimizer over named fp32 parameters and their fp32 gradients on one <see cref="IOps"/>. The state of a
/// parameter is created on its first <see cref="Step"/> (zeros, from the parameter's element count) on the ops'
/// memory, and is keyed by the parameter's name, so the list passed to Step may change between calls.
/// </summary>
public interface IOptimizer : IDisposable
{
    /// <summary>The factory name: "adamw", "paged-adamw", "adamw8bit", "paged-adamw8bit".</summary>
    string Name { get; }

    AdamWOptions Options { get; }

    /// <summary>
    /// One update of every listed parameter with learning rate <paramref name="lr"/>. The gradients are read (times
    /// <paramref name="gradScale"/>, e.g. a clipping coefficient from <see cref="GradientClipping.ClipCoefficient"/>)
    /// and not modified. Each parameter's step counter (bias correction) advances by one.
    /// </summary>
    void Step(IReadOnlyList<(string Name, Tensor Param, Tensor Grad)> parameters, double lr, double gradScale = 1.0);

    /// <summary>Bytes of all parameter states (device and paged; the two 1 KB dynamic maps of the 8-bit forms not counted).</summary>
    long StateBytes { get; }

    /// <summary>Of <see cref="StateBytes"/>, the bytes in managed (paged) memory.</summary>
    long PagedStateBytes { get; }

    /// <summary>
    /// The state as tensors for a checkpoint (write them with <see cref="SafetensorsWriter"/>): per parameter
    /// "NAME.step" (I64 [1]) and either "NAME.exp_avg", "NAME.exp_avg_sq" (F32 [n], torch's names) or, for 8-bit state,
    /// "NAME.state1", "NAME.state2" (U8 [n]) and "NAME.absmax1", "NAME.absmax2" (F32 [ceil(n/256)], bitsandbytes' names).
    /// </summary>
    IReadOnlyList<SafetensorsTensor> SaveState();

    /// <summary>Replaces the state of every parameter named in <paramref name="tensors"/> (as written by <see cref="SaveState"/>).</summary>
    void LoadState(IEnumerable<SafetensorsTensor> tensors);
}

/// <summary>Creates optimizers by the names the CLI's --optim takes.</summary>
public static class OptimizerFactory
{
    public static readonly IReadOnlyList<string> Names = ["adamw", "paged-adamw", "adamw8bit", "paged-adamw8bit"];

    public static IOptimizer Create(string name, IOps ops, AdamWOptions? options = null) => name?.ToLowerInvariant() switch
    {
        "adamw" => new AdamW(ops, options),
        "paged-adamw" => new PagedAdamW(ops, options),
        "adamw8bit" => new AdamW8bit(ops, options),
        "paged-adamw8bit" => new PagedAdamW8bit(ops, options),
        _ => throw new ArgumentException($"unknown optimizer '{name}': expected one of {string.Join(", ", Names)}", nameof(name)),
    };
}
