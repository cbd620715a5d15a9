using System.CommandLine;
using NativePeft.Ops;
using NativePeft.Runtime;
using Spectre.Console;

namespace NativePeft.Cli.Commands;

/// <summary>`nativepeft info`: devices, why CUDA is unavailable if it is, the kernel files, the BLAS.</summary>
public static class InfoCommand
{
    public static Command Create(TextWriter stdout)
    {
        var cmd = new Command("info", "Show the devices found, the kernel files and the BLAS in use");
        cmd.SetAction(_ =>
        {
            var console = Output.Console(stdout);
            var table = new Table().Border(TableBorder.Rounded).AddColumn("component").AddColumn("status");

            if (CudaGpu.TryCreate(out var cuda, out var cudaReason))
            {
                using (cuda)
                {
                    var p = cuda!.Properties;
                    table.AddRow("CUDA device", Markup.Escape(
                        $"{p.Name}, compute {p.ComputeCapabilityMajor}.{p.ComputeCapabilityMinor}, {p.MultiprocessorCount} SMs, " +
                        $"{Output.Bytes(p.TotalMemoryBytes)}, driver {p.DriverVersion / 1000}.{p.DriverVersion % 1000 / 10}"));
                }
            }
            else
            {
                table.AddRow("CUDA device", "[yellow]unavailable[/]: " + Markup.Escape(cudaReason));
            }

            if (EmulatedGpu.TryCreate(out var emu, out var emuReason))
            {
                using (emu)
                    table.AddRow("emulator", Markup.Escape($"{emu!.Properties.Name}: {KernelLocator.EmulatorLibraryPath}"));
            }
            else
            {
                table.AddRow("emulator", "[red]unavailable[/]: " + Markup.Escape(emuReason));
            }

            var modules = KernelLocator.Modules();
            table.AddRow("kernel files", modules.Count == 0
                ? "[yellow]none[/] in " + Markup.Escape(KernelLocator.Directory) + " (nvcc was not available at build time)"
                : Markup.Escape(string.Join(", ", modules.Select(m =>
                    m.Name + " (" + string.Join("+", new[] { m.PtxPath is null ? null : "ptx", m.FatbinPath is null ? null : "fatbin" }.Where(s => s is not null)) + ")"))
                    + " in " + KernelLocator.Directory));

            table.AddRow("BLAS", HostBlas.IsAvailable ? Markup.Escape(HostBlas.Description) : "[yellow]unavailable[/]: " + Markup.Escape(HostBlas.Description));
            table.AddRow(".NET", Markup.Escape($"{Environment.Version}, {System.Runtime.InteropServices.RuntimeInformation.RuntimeIdentifier}, {Environment.ProcessorCount} cores"));
            console.Write(table);
            return 0;
        });
        return cmd;
    }
}
