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

    /// <summary>The options of a command that runs a model: --device (see <see cref="Create"/>), --precision, --device-memory.</summary>
    public static (Option<string> Device, Option<string> Precision, Option<string?> Memory) CreateRun(string defaultValue, string description) =>
        (Create(defaultValue, description), CreatePrecision(), CreateMemory());

    /// <summary>--quantize nf4|fp4 (none when not given): load the base's linear weights in 4 bits (generate and eval).</summary>
    public static Option<string?> CreateQuantize(string description)
    {
        var option = new Option<string?>("--quantize") { Description = description };
        option.AcceptOnlyFromAmong("nf4", "fp4");
        return option;
    }

    /// <summary>Null for "cpu"; otherwise the device, or a CliException saying why it is unavailable.</summary>
    public static IGpu? Open(string name) =>
        name == "cpu" ? null : GpuFactory.TryCreate(name, out var reason) ?? throw new CliException($"--device {name}: {reason}");

    /// <summary>--device-memory SIZE: at most this much of the device's memory for the run (the plan is checked against it).</summary>
    public static Option<string?> CreateMemory() => new("--device-memory")
    {
        Description = "use at most this much device memory, e.g. 20GiB, 512MiB or bytes (default: the device's free memory); " +
                      "the memory plan is checked against it before anything is loaded",
    };

    /// <summary>--device-memory in bytes (null when not given); not a size, or given with --device cpu, is a CliException (exit 2).</summary>
    public static long? Memory(string? text, string device)
    {
        if (text is null) return null;
        long bytes = EstimateCommand.ParseSize(text) is { } b && b > 0
            ? b : throw new CliException($"--device-memory {text}: expected a positive size such as 20GiB, 512MiB or a number of bytes", 2);
        if (device == "cpu") throw new CliException($"--device-memory {text}: limits a GPU device's memory; --device cpu has no device pool", 2);
        return bytes;
    }

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
