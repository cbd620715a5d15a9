using NativePeft.Data;
using NUnit.Framework;

namespace NativePeft.Tests.DataTests;

public class BuiltinTaskTests
{
    private const int M = TrainingExample.IgnoreIndex;

    [Test]
    public void Generate_IsDeterministicFromTheSeed()
    {
        var a = BuiltinTask.Generate(new BuiltinTaskOptions { Seed = 7 });
        var b = BuiltinTask.Generate(new BuiltinTaskOptions { Seed = 7 });
        var c = BuiltinTask.Generate(new BuiltinTaskOptions { Seed = 8 });
        Assert.That(a.Train, Is.EqualTo(b.Train));
        Assert.That(a.Eval, Is.EqualTo(b.Eval));
        Assert.That(a.Train.Take(20), Is.Not.EqualTo(c.Train.Take(20)));
        Assert.That((a.Train.Count, a.Eval.Count), Is.EqualTo((2000, 200)));
        // Pinned first problems: a change to the generator (which would change every measured result) shows up here.
        Assert.That(a.Train.Take(3).Select(p => p.Word), Is.EqualTo(new[] { "axpl", "mid", "owiqt" }));
    }

    [Test]
    public void Problems_AreReversals_AndSplitsAreDisjointAndUnique()
    {
        var t = BuiltinTask.Generate(new BuiltinTaskOptions { Seed = 1 });
        foreach (var p in t.Train.Concat(t.Eval))
        {
            Assert.That(p.Word.Length, Is.InRange(3, 5));
            Assert.That(p.Word, Does.Match("^[a-z]+$"));
            Assert.That(p.Prompt, Is.EqualTo($"reverse: {p.Word}\n"));
            Assert.That(p.Answer, Is.EqualTo(new string(p.Word.Reverse().ToArray())));
        }
        var trainWords = t.Train.Select(p => p.Word).ToHashSet();
        Assert.That(trainWords.Count, Is.EqualTo(t.Train.Count));
        Assert.That(t.Eval.Select(p => p.Word).Distinct().Count(), Is.EqualTo(t.Eval.Count));
        Assert.That(t.Eval.Any(p => trainWords.Contains(p.Word)), Is.False);
        Assert.That(t.Eval.All(p => BuiltinTask.IsHeldOut(p.Word)) && t.Train.All(p => !BuiltinTask.IsHeldOut(p.Word)));
        Assert.That(BuiltinTask.Problem(BuiltinTaskKind.Uppercase, "abc").Answer, Is.EqualTo("ABC"));
    }

    [Test]
    public void Dataset_MasksThePrompt_LossOnAnswerAndEos()
    {
        var t = BuiltinTask.Generate(new BuiltinTaskOptions { Seed = 3, TrainCount = 10, EvalCount = 5 });
        var d = t.TrainDataset(ByteTokenizer.Instance);
        for (int i = 0; i < d.Count; i++)
        {
            var p = t.Train[i];
            int[] expectIds = [256, .. p.Prompt.Select(c => (int)c), .. p.Answer.Select(c => (int)c), 257];
            int[] expectLabels = [.. Enumerable.Repeat(M, 1 + p.Prompt.Length), .. p.Answer.Select(c => (int)c), 257];
            Assert.That(d[i].InputIds, Is.EqualTo(expectIds));
            Assert.That(d[i].Labels, Is.EqualTo(expectLabels));
        }
        Assert.That(t.EvalDataset(ByteTokenizer.Instance).Count, Is.EqualTo(5));
    }

    [Test]
    public void ExactMatch()
    {
        Assert.That(BuiltinTask.ExactMatch("dcba", "dcba"), Is.True);
        Assert.That(BuiltinTask.ExactMatch("dcba\n", "dcba"), Is.True);
        Assert.That(BuiltinTask.ExactMatch("dcb", "dcba"), Is.False);
        Assert.That(BuiltinTask.ExactMatch("dcbaa", "dcba"), Is.False);
        Assert.That(BuiltinTask.ExactMatch(" dcba", "dcba"), Is.False);
        Assert.That(BuiltinTask.ExactMatch("DCBA", "dcba"), Is.False);
        var bt = ByteTokenizer.Instance;
        Assert.That(BuiltinTask.ExactMatch([.. bt.Encode("cba", false), 257, 'x'], "cba", bt), Is.True, "cut at eos");
        Assert.That(BuiltinTask.ExactMatch([.. bt.Encode("cbax", false)], "cba", bt), Is.False);
        Assert.That(BuiltinTask.ExactMatchRate([("a", "a"), ("b", "c"), ("d", "d"), ("e", "")]), Is.EqualTo(0.5));
    }

    [Test]
    public void PretrainCorpus_IsDeterministic_AndNeverShowsTheTask()
    {
        var a = BuiltinTask.PretrainCorpus(5, 500);
        Assert.That(a, Is.EqualTo(BuiltinTask.PretrainCorpus(5, 500)));
        Assert.That(a, Is.Not.EqualTo(BuiltinTask.PretrainCorpus(6, 500)));
        Assert.That(a.Any(l => l.Contains("reverse") || l.Contains("upper")), Is.False);
        Assert.That(a.Count(l => l.StartsWith("copy: ", StringComparison.Ordinal)), Is.InRange(150, 350));
    }
}

public class BatcherTests
{
    private const int M = TrainingExample.IgnoreIndex;

    private static List<TrainingExample> Examples(int n) =>
        Enumerable.Range(0, n).Select(i => TrainingExample.CausalLm(Enumerable.Range(1, 1 + i % 4).Select(k => i * 10 + k).ToArray())).ToList();

    [Test]
    public void Padding_PadsWithPadId_LabelsIgnoredOnPadding()
    {
        var ex = new List<TrainingExample> { new([1, 2, 3], [M, 2, 3]), TrainingExample.CausalLm([4]) };
        var b = new Batcher(ex, new BatcherOptions { BatchSize = 2, SeqLen = 4, Shuffle = false }, padId: 99);
        var batch = b.Next();
        Assert.That((batch.Rows, batch.SeqLen, batch.Examples, batch.Tokens), Is.EqualTo((2, 4, 2, 4)));
        Assert.That(batch.InputIds, Is.EqualTo(new[] { 1, 2, 3, 99, 4, 99, 99, 99 }));
        Assert.That(batch.Labels, Is.EqualTo(new[] { M, 2, 3, M, 4, M, M, M }));
        Assert.That(batch.LabelledTokens, Is.EqualTo(3));
    }

    [Test]
    public void Padding_TruncatesLongExamples()
    {
        var b = new Batcher([TrainingExample.CausalLm([1, 2, 3, 4, 5])], new BatcherOptions { BatchSize = 1, SeqLen = 3 }, 0);
        Assert.That(b.Next().InputIds, Is.EqualTo(new[] { 1, 2, 3 }));
        Assert.That(b.Truncated, Is.EqualTo(1));
    }

    [Test]
    public void Shuffle_IsDeterministic_AndEachEpochIsAPermutation()
    {
        var ex = Examples(10);
        var o = new BatcherOptions { BatchSize = 3, SeqLen = 4, Seed = 42 };
        var a = new Batcher(ex, o, 0);
        var b = new Batcher(ex, o, 0);
        var c = new Batcher(ex, o with { Seed = 43 }, 0);
        var seqA = Enumerable.Range(0, 12).Select(_ => a.Next()).ToList();
        var seqB = Enumerable.Range(0, 12).Select(_ => b.Next()).ToList();
        var seqC = Enumerable.Range(0, 12).Select(_ => c.Next()).ToList();
        Assert.That(seqA.Select(x => x.InputIds), Is.EqualTo(seqB.Select(x => x.InputIds)));
        Assert.That(seqA.Select(x => x.InputIds), Is.Not.EqualTo(seqC.Select(x => x.InputIds)));
        // 10 examples, B = 3: batches of 3, 3, 3, 1 per epoch; epochs 0, 1, 2 differ in order.
        Assert.That(seqA.Select(x => x.Rows), Is.EqualTo(new[] { 3, 3, 3, 1, 3, 3, 3, 1, 3, 3, 3, 1 }));
        Assert.That(seqA.Select(x => x.Epoch), Is.EqualTo(new[] { 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2 }));
        for (int e = 0; e < 3; e++)
        {
            var firsts = seqA.Skip(4 * e).Take(4).SelectMany(x => Enumerable.Range(0, x.Rows).Select(r => x.InputIds[r * 4] / 10)).ToList();
            Assert.That(firsts.Order(), Is.EqualTo(Enumerable.Range(0, 10)), $"epoch {e} visits every example once");
        }
        Assert.That(a.Permutation(0), Is.Not.EqualTo(a.Permutation(1)));
        Assert.That(new Batcher(ex, o with { Shuffle = false }, 0).Permutation(3), Is.EqualTo(Enumerable.Range(0, 10)));
    }

    [Test]
    public void DropLast_LeavesOutTheShortBatch()
    {
        var b = new Batcher(Examples(10), new BatcherOptions { BatchSize = 3, SeqLen = 4, DropLast = true, Seed = 1 }, 0);
        var seq = Enumerable.Range(0, 6).Select(_ => b.Next()).ToList();
        Assert.That(seq.Select(x => x.Rows), Is.All.EqualTo(3));
        Assert.That(seq.Select(x => x.Epoch), Is.EqualTo(new[] { 0, 0, 0, 1, 1, 1 }));
        Assert.Throws<ArgumentException>(() => new Batcher(Examples(2), new BatcherOptions { BatchSize = 3, DropLast = true }, 0));
    }

    [TestCase(BatchMode.Padding)]
    [TestCase(BatchMode.Packing)]
    [TestCase(BatchMode.Concatenation)]
    public void SaveAndRestorePosition_GivesTheIdenticalNextBatches(BatchMode mode)
    {
        var ex = Examples(11);
        var o = new BatcherOptions { BatchSize = 2, SeqLen = 6, Seed = 9, Mode = mode };
        var full = new Batcher(ex, o, 0, eosId: 98);
        var all = Enumerable.Range(0, 15).Select(_ => full.Next()).ToList();

        var first = new Batcher(ex, o, 0, eosId: 98);
        for (int i = 0; i < 7; i++) first.Next();
        string saved = first.Position.ToJson();

        var resumed = new Batcher(ex, o with { Seed = 12345 }, 0, eosId: 98);   // the position's seed wins
        resumed.Restore(DataPosition.FromJson(saved));
        var rest = Enumerable.Range(0, 8).Select(_ => resumed.Next()).ToList();
        Assert.That(rest.Select(x => x.InputIds), Is.EqualTo(all.Skip(7).Select(x => x.InputIds)));
        Assert.That(rest.Select(x => x.Labels), Is.EqualTo(all.Skip(7).Select(x => x.Labels)));
        Assert.That(rest.Select(x => x.Positions), Is.EqualTo(all.Skip(7).Select(x => x.Positions)));
        Assert.That(rest.Select(x => x.Epoch), Is.EqualTo(all.Skip(7).Select(x => x.Epoch)));
        Assert.Throws<ArgumentException>(() => new Batcher(Examples(5), o, 0, 98).Restore(DataPosition.FromJson(saved)));
    }

    [Test]
    public void Position_JsonRoundTrip()
    {
        var p = new DataPosition(3, 17, ulong.MaxValue, 100);
        Assert.That(DataPosition.FromJson(p.ToJson()), Is.EqualTo(p));
    }

    [Test]
    public void Packing_FillsRows_PositionsRestartPerExample_FirstLabelsIgnored()
    {
        const int eos = 9, pad = 0;
        var ex = new List<TrainingExample>
        {
            new([1, 2], [M, 2]),
            new([3, 4, eos], [3, 4, eos]),
            TrainingExample.CausalLm([5, 6]),
            TrainingExample.CausalLm([7, 7, 7, 7, 7, 7, 7]), // longer than a row: truncated, alone in its row
        };
        var b = new Batcher(ex, new BatcherOptions { BatchSize = 3, SeqLen = 6, Shuffle = false, Mode = BatchMode.Packing }, pad, eos);
        var batch = b.Next();
        Assert.That((batch.Rows, batch.Examples, batch.Tokens), Is.EqualTo((3, 4, 5 + 2 + 6)));
        // Back to back, no separator (each example is a document of its own).
        Assert.That(batch.InputIds, Is.EqualTo(new[]
        {
            1, 2, 3, 4, eos, pad,
            5, 6, pad, pad, pad, pad,
            7, 7, 7, 7, 7, 7,
        }));
        // Each example's first label is -100: the model's shift would otherwise train the previous example's last
        // token to predict it.
        Assert.That(batch.Labels, Is.EqualTo(new[]
        {
            M, 2, M, 4, eos, M,
            M, 6, M, M, M, M,
            M, 7, 7, 7, 7, 7,
        }));
        // Positions restart at every example; the padding at a row's end is a document of its own.
        Assert.That(batch.Positions, Is.EqualTo(new[]
        {
            0, 1, 0, 1, 2, 0,
            0, 1, 0, 1, 2, 3,
            0, 1, 2, 3, 4, 5,
        }));
        Assert.That(batch.LabelledTokens, Is.EqualTo(3 + 1 + 5));
        Assert.That(b.Truncated, Is.EqualTo(1));
        Assert.That(b.Position.Epoch, Is.EqualTo(0));
        Assert.That(b.Next().Epoch, Is.EqualTo(1));
    }

    [Test]
    public void Padding_HasNoPositions_PackingNeedsNoEos()
    {
        var ex = Examples(3);
        Assert.That(new Batcher(ex, new BatcherOptions { BatchSize = 2, SeqLen = 4 }, 0).Next().Positions, Is.Null);
        var packed = new Batcher(ex, new BatcherOptions { BatchSize = 1, SeqLen = 8, Shuffle = false, Mode = BatchMode.Packing }, 0).Next();
        Assert.That(packed.Positions, Is.EqualTo(new[] { 0, 0, 1, 0, 1, 2, 0, 1 }));
        Assert.That(packed.InputIds, Is.EqualTo(new[] { 1, 11, 12, 21, 22, 23, 0, 0 }));
        Assert.Throws<ArgumentException>(() => new Batcher(ex, new BatcherOptions { Mode = BatchMode.Concatenation }, 0));
    }

    [Test]
    public void Concatenation_FillsRows_WithEosBetweenExamples()
    {
        const int eos = 9, pad = 0;
        var ex = new List<TrainingExample>
        {
            new([1, 2], [M, 2]),          // no eos at the end: a separator follows
            new([3, 4, eos], [3, 4, eos]),// ends with eos: no separator
            TrainingExample.CausalLm([5, 6]),
            TrainingExample.CausalLm([7, 7, 7, 7, 7, 7, 7]), // longer than a row: truncated, alone in its row
        };
        var b = new Batcher(ex, new BatcherOptions { BatchSize = 3, SeqLen = 6, Shuffle = false, Mode = BatchMode.Concatenation }, pad, eos);
        var batch = b.Next();
        Assert.That((batch.Rows, batch.Examples), Is.EqualTo((3, 4)));
        Assert.That(batch.Positions, Is.Null, "one sequence per row");
        Assert.That(batch.InputIds, Is.EqualTo(new[]
        {
            1, 2, eos, 3, 4, eos,
            5, 6, pad, pad, pad, pad,
            7, 7, 7, 7, 7, 7,
        }));
        Assert.That(batch.Labels, Is.EqualTo(new[]
        {
            M, 2, M, 3, 4, eos,
            5, 6, M, M, M, M,
            7, 7, 7, 7, 7, 7,
        }));
        Assert.That(b.Truncated, Is.EqualTo(1));
        Assert.That(b.Position.Epoch, Is.EqualTo(0));
        Assert.That(b.Next().Epoch, Is.EqualTo(1));
    }

    [Test]
    public void Sequential_OnePassInOrder()
    {
        var ex = Examples(5);
        var batches = Batcher.Sequential(ex, 2, 4, 0).ToList();
        Assert.That(batches.Select(x => x.Rows), Is.EqualTo(new[] { 2, 2, 1 }));
        Assert.That(batches.SelectMany(x => Enumerable.Range(0, x.Rows).Select(r => x.InputIds[r * 4] / 10)), Is.EqualTo(new[] { 0, 1, 2, 3, 4 }));
    }
}
