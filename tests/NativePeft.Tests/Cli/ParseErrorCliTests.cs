using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// The parser's errors in the user's terms (issue: a new user's trial): a bad value names the option and the kind of
/// value expected, not a .NET type; a misspelled command or option gets the nearest one; exit 2, one line each.
/// </summary>
public class ParseErrorCliTests
{
    [Test]
    public void ANonIntegerStepsSaysAnIntegerWasExpected()
    {
        var r = CliProcess.Run("train", "--steps", "abc");
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        Assert.That(r.Stderr, Does.Contain("error: --steps: 'abc' is not an integer"), r.ToString());
        Assert.That(r.Stderr, Does.Not.Contain("System."), "no .NET type names");
    }

    [Test]
    public void ANonNumberLrSaysANumberWasExpected()
    {
        var r = CliProcess.Run("train", "--lr", "fast");
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        Assert.That(r.Stderr, Does.Contain("error: --lr: 'fast' is not a number"), r.ToString());
    }

    [Test]
    public void AMisspelledCommandGetsTheNearestOne()
    {
        var r = CliProcess.Run("trian");
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        Assert.That(r.Stderr, Does.Contain("unrecognized command or argument 'trian' (did you mean 'train'?)"), r.ToString());
    }

    [Test]
    public void AMisspelledOptionGetsTheNearestOfItsCommand()
    {
        var r = CliProcess.Run("train", "--stpes", "3");
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        Assert.That(r.Stderr, Does.Contain("unrecognized option '--stpes' (did you mean '--steps'?)"), r.ToString());
    }

    [Test]
    public void AnUnrelatedWordGetsNoSuggestion()
    {
        var r = CliProcess.Run("xyzzyplugh");
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        Assert.That(r.Stderr, Does.Contain("unrecognized command or argument 'xyzzyplugh'"), r.ToString());
        Assert.That(r.Stderr, Does.Not.Contain("did you mean"), r.ToString());
    }
}
