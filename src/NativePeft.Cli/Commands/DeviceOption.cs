using System.CommandLine;
using NativePeft.Numerics;
using NativePeft.Runtime;

namespace NativePeft.Cli.Commands;

/// <summary>
/// The --device option the commands share: cpu (the C# reference) or a device the kernels run on; and --precision,
/// the compute dtype on it.
/// </summary>
internal static class DeviceOption
{
    public static Option<string> Create(string defaultValue, string description)
    {
        var option = new Option<string>("--device") { Description = description, DefaultValueFactory = _ => defaultValue };
        option.AcceptOnlyFromAmong("cpu", "auto", "cuda", "emulator");
        return option;
    }

    /// <summary>Null for "cpu"; otherwise the device, or a CliException saying why it is unavailable.</summary>
    public static IGpu? Open(string name) =>
        name == "cpu" ? null : GpuFactory.TryCreate(name, out var reason) ?? throw new CliException($"--device {name}: {reason}");

    public static readonly string[] PrecisionNames = ["auto", "bf16", "fp32"];

    /// <summary>--precision auto|bf16|fp32 (default auto).</summary>
    public static Option<string> CreatePrecision()
    {
        var option = new Option<string>("--precision")
        {
            Description = "compute precision: bf16 (mixed precision: bf16 activations and weights, fp32 accumulation, LoRA and optimizer), " +
                          "fp32, or auto (bf16 on cuda and the emulator, fp32 on cpu)",
            DefaultValueFactory = _ => "auto",
        };
        option.AcceptOnlyFromAmong(PrecisionNames);
        return option;
    }

    /// <summary>
    /// The compute dtype (<see cref="Modules.LlamaModelOptions.ComputeDType"/>) for --precision on --device: auto is BF16
    /// on a GPU device (cuda, emulator, auto) and F32 on cpu; bf16 on cpu is a CliException (the CPU reference is fp32).
    /// </summary>
    public static DType ComputeDType(string precision, string device) => precision switch
    {
        "fp32" => DType.F32,
        "bf16" when device == "cpu" => throw new CliException(
            "--precision bf16: the CPU reference computes in fp32; use --device cuda|emulator|auto for bf16, or --precision fp32"),
        "bf16" => DType.BF16,
        "auto" => device == "cpu" ? DType.F32 : DType.BF16,
        _ => throw new CliException($"--precision {precision}: expected one of {string.Join(", ", PrecisionNames)}"),
    };
}
