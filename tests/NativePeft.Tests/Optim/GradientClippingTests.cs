using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Optim;
using NUnit.Framework;
using static NativePeft.Tests.Optim.OptimTestSupport;

namespace NativePeft.Tests.Optim;

/// <summary>
/// Global-norm clipping: Σ g² in fp64 against a naive sequential double sum written here — equal exactly on the CPU
/// (the same order), and on a GPU within (elements per thread + 2·8 tree levels + 2)·2⁻⁵³ relative (each square is
/// exact in double, only the additions round: we allow 1e-13) and identical on a second run (deterministic).
/// </summary>
[TestFixture("cpu")]
[TestFixture("emulated")]
[TestFixture("cuda")]
public sealed class GradientClippingTests(string device)
{
    private IOps _ops = null!;

    [SetUp] public void Create() => _ops = CreateOps(device);
    [TearDown] public void Dispose() => _ops?.Dispose();

    [Test]
    public void SumOfSquaresEqualsNaiveSum()
    {
        var rng = new Random(17);
        int[] sizes = [70001, 1, 256, 5000, 0];
        var host = sizes.Select(n => Normal(rng, n, 3.0)).ToArray();
        var grads = host.Select(h => h.Length == 0 ? _ops.Memory.Allocate(DType.F32, 0) : Upload(_ops, h)).ToList();
        double naive = 0;
        foreach (var h in host) foreach (float x in h) naive += (double)x * x;

        double sum = GradientClipping.SumOfSquares(_ops, grads);
        if (device == "cpu") Assert.That(sum, Is.EqualTo(naive));
        else Assert.That(Math.Abs(sum - naive), Is.LessThanOrEqualTo(1e-13 * naive));
        Assert.That(GradientClipping.SumOfSquares(_ops, grads), Is.EqualTo(sum), "deterministic");
        Assert.That(GradientClipping.GlobalNorm(_ops, grads), Is.EqualTo(Math.Sqrt(sum)));
    }

    [Test]
    public void ClipScalesToMaxNormOnlyWhenAbove()
    {
        var g1 = Upload(_ops, [3f, 0f]);
        var g2 = Upload(_ops, [4f]);
        double norm = GradientClipping.ClipGlobalNorm(_ops, [g1, g2], 1.0); // ‖(3, 0, 4)‖ = 5
        Assert.That(norm, Is.EqualTo(5.0));
        double c = 1.0 / (5.0 + 1e-6);
        Assert.That(Download(_ops, g1), Is.EqualTo(new[] { (float)(3 * c), 0f }).Within(1e-7));
        Assert.That(Download(_ops, g2)[0], Is.EqualTo((float)(4 * c)).Within(1e-7));

        double after = GradientClipping.ClipGlobalNorm(_ops, [g1, g2], 10.0);
        Assert.That(after, Is.EqualTo(1.0).Within(1e-6));
        Assert.That(Download(_ops, g2)[0], Is.EqualTo((float)(4 * c)), "below max norm: untouched");
        Assert.That(GradientClipping.ClipCoefficient(5.0, 1.0), Is.EqualTo(1.0 / (5.0 + 1e-6)));
        Assert.That(GradientClipping.ClipCoefficient(0.5, 1.0), Is.EqualTo(1.0));
    }
}
