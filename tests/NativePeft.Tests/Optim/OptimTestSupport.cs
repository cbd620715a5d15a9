using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Tests.Ops;
using NUnit.Framework;

namespace NativePeft.Tests.Optim;

/// <summary>Backends and helpers of the optimizer tests.</summary>
internal static class OptimTestSupport
{
    /// <summary>"cpu" → CpuOps; "emulated" → GpuOps over the emulator; "cuda" → GpuOps over CUDA (Ignore when absent).</summary>
    public static IOps CreateOps(string device)
    {
        switch (device)
        {
            case "cpu": return new CpuOps();
            case "emulated": return new GpuOps(TestGpus.CreateEmulated(), ownsGpu: true);
            case "cuda":
                var gpu = TestGpus.TryCreateCuda(out string reason);
                if (gpu is null) Assert.Ignore($"no CUDA device: {reason}");
                return new GpuOps(gpu!, ownsGpu: true);
            default: throw new ArgumentException(device);
        }
    }

    public static Tensor Upload(IOps ops, float[] values)
    {
        var t = ops.Memory.Allocate(DType.F32, values.Length);
        ops.Upload<float>(values, t);
        return t;
    }

    public static float[] Download(IOps ops, Tensor t)
    {
        var a = new float[t.Count];
        ops.Download<float>(t, a);
        return a;
    }

    /// <summary>Standard normal samples (Box–Muller over a seeded System.Random).</summary>
    public static float[] Normal(Random rng, int n, double scale = 1.0)
    {
        var a = new float[n];
        for (int i = 0; i < n; i++)
        {
            double u1 = 1.0 - rng.NextDouble(), u2 = rng.NextDouble();
            a[i] = (float)(scale * Math.Sqrt(-2 * Math.Log(u1)) * Math.Cos(2 * Math.PI * u2));
        }
        return a;
    }
}
