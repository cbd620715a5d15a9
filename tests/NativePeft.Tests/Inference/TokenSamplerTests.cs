using NativePeft.Inference;
using NUnit.Framework;

namespace NativePeft.Tests.Inference;

/// <summary><see cref="TokenSampler"/> and <see cref="SamplingRandom"/> on given logits, against hand-computed distributions.</summary>
public class TokenSamplerTests
{
    [Test]
    public void GreedyIsTheFirstMaximum()
    {
        Assert.That(TokenSampler.Argmax([0.5, 2, -1, 2]), Is.EqualTo(1));
        Assert.That(TokenSampler.Sample([0.5, 2, -1, 3], new GenerationOptions(), 0.99), Is.EqualTo(3), "temperature 0 ignores the draw");
    }

    [Test]
    public void ExtremeTemperaturesAndNonFiniteLogitsNeverGiveNaN()
    {
        // A tiny temperature: logits / T overflow to ±∞, but (l − max) / T does not — the distribution is the argmax's.
        var p = TokenSampler.Distribution([1, 3, 2, -5], 1e-310);
        Assert.That(p, Is.EqualTo(new double[] { 0, 1, 0, 0 }));
        Assert.That(TokenSampler.Sample([1, 3, 2, -5], new GenerationOptions { Temperature = 1e-310 }, 0.999), Is.EqualTo(1));
        // −∞ logits get probability 0; all −∞ falls back to the first id (argmax), not to the last.
        Assert.That(TokenSampler.Distribution([double.NegativeInfinity, 0, double.NegativeInfinity], 1.0), Is.EqualTo(new double[] { 0, 1, 0 }));
        Assert.That(TokenSampler.Distribution([double.NegativeInfinity, double.NegativeInfinity], 1.0), Is.EqualTo(new double[] { 1, 0 }));
        // NaN logits are never chosen; only NaN is an error.
        Assert.That(TokenSampler.Argmax([double.NaN, -1, 2, double.NaN]), Is.EqualTo(2));
        Assert.That(TokenSampler.Distribution([double.NaN, 0, 0], 1.0), Is.EqualTo(new double[] { 0, 0.5, 0.5 }));
        Assert.Throws<ArgumentException>(() => TokenSampler.Argmax([double.NaN, double.NaN]));
    }

    [Test]
    public void TemperatureScalesTheLogitsBeforeTheSoftmax()
    {
        // logits (ln 1, ln 2, ln 4) / T = 2 → p ∝ (1, √2, 2): (1, 1.41421356, 2) / 4.41421356.
        double[] logits = [0, Math.Log(2), Math.Log(4)];
        var p = TokenSampler.Distribution(logits, 2.0);
        double z = 1 + Math.Sqrt(2) + 2;
        Assert.That(p[0], Is.EqualTo(1 / z).Within(1e-15));
        Assert.That(p[1], Is.EqualTo(Math.Sqrt(2) / z).Within(1e-15));
        Assert.That(p[2], Is.EqualTo(2 / z).Within(1e-15));
        // T = 0.5 → p ∝ (1, 4, 16) / 21.
        var sharp = TokenSampler.Distribution(logits, 0.5);
        Assert.That(sharp, Is.EqualTo(new[] { 1 / 21.0, 4 / 21.0, 16 / 21.0 }).Within(1e-15));
    }

    [Test]
    public void TopPKeepsTheSmallestNucleusReachingP()
    {
        // p = (0.1, 0.4, 0.2, 0.3) (logits ln p). Sorted: 0.4 (id 1), 0.3 (id 3), 0.2 (id 2), 0.1 (id 0).
        double[] logits = [Math.Log(0.1), Math.Log(0.4), Math.Log(0.2), Math.Log(0.3)];
        // top_p 0.5: 0.4 < 0.5, so id 3 joins (0.7 ≥ 0.5) → {1, 3} renormalized to (0.4, 0.3) / 0.7.
        var p = TokenSampler.Distribution(logits, 1.0, topP: 0.5);
        Assert.That(p, Is.EqualTo(new[] { 0, 0.4 / 0.7, 0, 0.3 / 0.7 }).Within(1e-12));
        // top_p 0.4: id 1 alone reaches 0.4 → one-hot.
        Assert.That(TokenSampler.Distribution(logits, 1.0, topP: 0.4), Is.EqualTo(new[] { 0, 1.0, 0, 0 }).Within(1e-12));
        // top_p 0.75: 0.4, 0.7 < 0.75, id 2 joins (0.9) → {1, 3, 2} / 0.9.
        Assert.That(TokenSampler.Distribution(logits, 1.0, topP: 0.75), Is.EqualTo(new[] { 0, 0.4 / 0.9, 0.2 / 0.9, 0.3 / 0.9 }).Within(1e-12));
        // top_p 1: everything.
        Assert.That(TokenSampler.Distribution(logits, 1.0, topP: 1.0), Is.EqualTo(new[] { 0.1, 0.4, 0.2, 0.3 }).Within(1e-12));
        // Drawing from the 0.5 nucleus: cumulative in id order (id 1: 0.571, id 3: 1) → u 0.5 gives 1, u 0.6 gives 3.
        var o = new GenerationOptions { Temperature = 1, TopP = 0.5 };
        Assert.That(TokenSampler.Sample(logits, o, 0.5), Is.EqualTo(1));
        Assert.That(TokenSampler.Sample(logits, o, 0.6), Is.EqualTo(3));
    }

    [Test]
    public void TopKRestrictsToTheKLargest()
    {
        double[] logits = [1, 3, 2, 0, 2.5];
        var p = TokenSampler.Distribution(logits, 1.0, topK: 2);
        double z = Math.Exp(3) + Math.Exp(2.5);
        Assert.That(p, Is.EqualTo(new[] { 0, Math.Exp(3) / z, 0, 0, Math.Exp(2.5) / z }).Within(1e-15));
        // top-k 1 is greedy for any draw and temperature.
        var rng = new SamplingRandom(9);
        for (int i = 0; i < 50; i++)
            Assert.That(TokenSampler.Sample(logits, new GenerationOptions { Temperature = 1.7, TopK = 1 }, rng.NextDouble()), Is.EqualTo(1));
    }

    [Test]
    public void DrawFollowsTheCumulativeDistributionInIdOrder()
    {
        double[] p = [0.25, 0, 0.5, 0.25];
        Assert.That(TokenSampler.Draw(p, 0.0), Is.EqualTo(0));
        Assert.That(TokenSampler.Draw(p, 0.2499), Is.EqualTo(0));
        Assert.That(TokenSampler.Draw(p, 0.25), Is.EqualTo(2));
        Assert.That(TokenSampler.Draw(p, 0.7499), Is.EqualTo(2));
        Assert.That(TokenSampler.Draw(p, 0.75), Is.EqualTo(3));
        Assert.That(TokenSampler.Draw(p, 0.9999999), Is.EqualTo(3));
    }

    [Test]
    public void SamplingRandomIsSplitMix64AndReproducible()
    {
        // SplitMix64 from state 0: the first output is 0xE220A8397B1DCDAF (Vigna's reference sequence).
        var r = new SamplingRandom(0);
        Assert.That(r.NextDouble(), Is.EqualTo((0xE220A8397B1DCDAFUL >> 11) * (1.0 / (1UL << 53))));
        var a = new SamplingRandom(42);
        var b = new SamplingRandom(42);
        var c = new SamplingRandom(43);
        var xa = Enumerable.Range(0, 100).Select(_ => a.NextDouble()).ToArray();
        Assert.That(Enumerable.Range(0, 100).Select(_ => b.NextDouble()), Is.EqualTo(xa));
        Assert.That(Enumerable.Range(0, 100).Select(_ => c.NextDouble()), Is.Not.EqualTo(xa));
        Assert.That(xa.All(x => x is >= 0 and < 1), Is.True);
        // Empirical frequencies of 20000 draws from (0.2, 0.5, 0.3) within 4σ.
        var counts = new int[3];
        var rng = new SamplingRandom(7);
        for (int i = 0; i < 20000; i++) counts[TokenSampler.Draw([0.2, 0.5, 0.3], rng.NextDouble())]++;
        double[] expected = [0.2, 0.5, 0.3];
        for (int i = 0; i < 3; i++)
            Assert.That(counts[i] / 20000.0, Is.EqualTo(expected[i]).Within(4 * Math.Sqrt(expected[i] * (1 - expected[i]) / 20000)));
    }

    [Test]
    public void OptionsAreValidated()
    {
        Assert.Throws<OptionException>(() => new GenerationOptions { Temperature = -0.1 }.Validate());
        Assert.Throws<OptionException>(() => new GenerationOptions { TopP = 0 }.Validate());
        Assert.Throws<OptionException>(() => new GenerationOptions { TopP = 1.5 }.Validate());
        Assert.Throws<OptionException>(() => new GenerationOptions { TopK = -1 }.Validate());
        Assert.Throws<OptionException>(() => new GenerationOptions { MaxNewTokens = -1 }.Validate());
        Assert.DoesNotThrow(() => new GenerationOptions { Temperature = 0.7, TopP = 0.9, TopK = 40 }.Validate());
    }
}
