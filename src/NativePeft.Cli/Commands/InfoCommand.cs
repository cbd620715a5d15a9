using System.CommandLine;
using NativePeft.Distributed;
using NativePeft.Ops;
using NativePeft.Runtime;
using Spectre.Console;

namespace NativePeft.Cli.Commands;

/// <summary>
/// `nativepeft info`: devices, why CUDA is unavailable if it is, the kernel files, the BLAS, cuBLAS, NCCL, and below
/// the table where the CUDA driver, cuBLAS and NCCL were looked for, in order: what loaded, what was there but failed to load
/// (with the loader's message), and the folders that did not have them.
/// </summary>
public static class InfoCommand
{
    public static Command Create(TextWriter stdout)
    {
        var cmd = new Command("info", "Show the devices found, the kernel files, the BLAS and cuBLAS in use, and where the CUDA libraries were looked for");
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

            var cublas = CudaLibraries.Cublas();
            table.AddRow("cuBLAS", cublas.Loaded is not null
                ? Markup.Escape(cublas.Summary + (CudaLibraries.CublasVersion() is { } v ? $", version {v}" : ""))
                : "[yellow]unavailable[/]: " + Markup.Escape(cublas.Summary));
            var nccl = NcclLibrary.Report();
            table.AddRow("NCCL", nccl.Loaded is not null
                ? Markup.Escape(nccl.Summary + (NcclLibrary.Version() is { } ncclVersion ? $", version {ncclVersion}" : ""))
                : "[yellow]unavailable[/] (the nccl backend of distributed training; the cpu backend works without it): " + Markup.Escape(nccl.Summary));
            table.AddRow("NVTX ranges", Markup.Escape(Nvtx.Status));
            table.AddRow("BLAS", HostBlas.IsAvailable ? Markup.Escape(HostBlas.Description) : "[yellow]unavailable[/]: " + Markup.Escape(HostBlas.Description));
            table.AddRow(".NET", Markup.Escape($"{Environment.Version}, {System.Runtime.InteropServices.RuntimeInformation.RuntimeIdentifier}, {Environment.ProcessorCount} cores"));
            console.Write(table);

            // Where the libraries were looked for, plain lines (paths and the loader's messages are not cut by the table).
            stdout.WriteLine("library search, in order:");
            foreach (var (name, report) in new[] { ("CUDA driver", CudaLibraries.Driver()), ("cuBLAS", cublas), ("NCCL", nccl) })
                foreach (var line in report.Lines()) stdout.WriteLine($"  {name}: {line}");
            return 0;
        });
        return cmd;
    }
}
