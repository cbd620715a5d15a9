using System.CommandLine;
using NativePeft.Runtime;

namespace NativePeft.Cli.Commands;

/// <summary>The --device option the commands share: cpu (the C# reference) or a device the kernels run on.</summary>
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
}
