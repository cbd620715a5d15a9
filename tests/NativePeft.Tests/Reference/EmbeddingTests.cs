using NativePeft.Ops.Reference;
using NUnit.Framework;

namespace NativePeft.Tests.Reference;

public class EmbeddingTests
{
    [Test]
    public void ForwardCopiesRowsAndBackwardScatterAdds()
    {
        // vocab 4, dim 3: row v = [10v, 10v+1, 10v+2]
        float[] table = [0, 1, 2, 10, 11, 12, 20, 21, 22, 30, 31, 32];
        int[] ids = [2, 0, 2, 3];
        var output = new float[12];
        EmbeddingRef.Forward<float>(ids, table, output, 4, 3);
        Assert.That(output, Is.EqualTo(new float[] { 20, 21, 22, 0, 1, 2, 20, 21, 22, 30, 31, 32 }));

        float[] dout = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        var dtable = new float[12];
        dtable[3] = 100; // row 1 gets nothing: kept; accumulation adds to existing values
        EmbeddingRef.Backward<float>(ids, dout, dtable, 4, 3);
        Assert.That(dtable, Is.EqualTo(new float[] { 4, 5, 6, 100, 0, 0, 1 + 7, 2 + 8, 3 + 9, 10, 11, 12 }));
    }

    [TestCase(-1, 1)]
    [TestCase(4, 2)]
    [TestCase(int.MinValue, 0)]
    public void OutOfRangeIdThrowsNamingPositionAndId(int badId, int position)
    {
        int[] ids = [0, 1, 2];
        ids[position] = badId;
        var output = new float[9];
        var ex = Assert.Throws<ArgumentOutOfRangeException>(() => EmbeddingRef.Forward<float>(ids, new float[12], output, 4, 3));
        Assert.That(ex!.Message, Does.Contain($"token id {badId} at position {position}"));
        Assert.That(output, Is.All.EqualTo(0f), "nothing written before validation");
        var dtable = new float[12];
        Assert.Throws<ArgumentOutOfRangeException>(() => EmbeddingRef.Backward<float>(ids, new float[9], dtable, 4, 3));
        Assert.That(dtable, Is.All.EqualTo(0f));
    }

    [Test]
    public void GradientMatchesFiniteDifferences()
    {
        const int vocab = 5, dim = 7;
        int[] ids = [4, 1, 1, 0, 4, 4];
        double[] table = GradCheck.RandomNormal(vocab * dim, 31);
        double[] dout = GradCheck.RandomNormal(ids.Length * dim, 32);
        double Loss()
        {
            var output = new double[ids.Length * dim];
            EmbeddingRef.Forward<double>(ids, table, output, vocab, dim);
            return GradCheck.Dot(output, dout);
        }
        var dtable = new double[vocab * dim];
        EmbeddingRef.Backward<double>(ids, dout, dtable, vocab, dim);
        GradCheck.Check("dtable", table, dtable, Loss);
        Assert.That(dtable.AsSpan(2 * dim, 2 * dim).ToArray(), Is.All.EqualTo(0.0), "ids 2 and 3 unused");
    }

    [Test]
    public void RepeatedIdsAccumulateInTokenOrder()
    {
        // Float addition is not associative: the result must be the left-to-right sum in token order.
        int[] ids = [0, 0, 0];
        float[] dout = [1e8f, 1f, -1e8f];
        var dtable = new float[1];
        EmbeddingRef.Backward<float>(ids, dout, dtable, 1, 1);
        Assert.That(dtable[0], Is.EqualTo(0f)); // 1e8 + 1 rounds to 1e8 in float (ulp 8), then − 1e8
    }
}
