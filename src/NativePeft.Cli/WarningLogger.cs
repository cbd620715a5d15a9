using Microsoft.Extensions.Logging;

namespace NativePeft.Cli;

/// <summary>The library's warnings (and worse) as "warning: ..." lines on the command's output; information is left out
/// (the commands print their own progress).</summary>
internal sealed class WarningLogger(TextWriter output) : ILogger
{
    public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
    public bool IsEnabled(LogLevel logLevel) => logLevel == LogLevel.Warning;
    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
    {
        if (!IsEnabled(logLevel)) return;
        ArgumentNullException.ThrowIfNull(formatter);
        output.WriteLine("warning: " + formatter(state, exception));
    }
}
