using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// Errors found while planning a GPU run (the memory plan is made before the model loads on a GPU device) are the
/// same one-line errors the CPU path gives, and leave nothing behind.
/// </summary>
public class TrainDeviceErrorsTests
{
    [TestCase("cpu")]
    [TestCase("emulator")]
    public void ARankLargerThanTheLayersIsOneErrorOnEveryDevice(string device)
    {
        using var dir = CliProcess.TempDir();
        var r = CliProcess.Run("train", "--model", "builtin", "--data", "builtin", "--steps", "1", "--rank", "100000",
            "--device", device, "--out", dir["out"]);
        Assert.That(r.ExitCode, Is.EqualTo(1), r.ToString());
        Assert.That(r.Stdout, Is.Empty, r.ToString());
        Assert.That(r.Stderr, Does.StartWith("error: --rank 100000: "), r.ToString());
        Assert.That(r.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries), Has.Length.EqualTo(1), "one line, no stack trace");
        Assert.That(Directory.Exists(dir["out"]), Is.False, "nothing written");
    }
}
