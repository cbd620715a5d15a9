namespace NativePeft;

/// <summary>
/// A setting of one of the library's option records (<see cref="Training.FineTuneOptions"/>,
/// <see cref="Inference.GenerationOptions"/>, <see cref="Training.PretrainOptions"/>, <see cref="Modules.LoraSettings"/>)
/// or of a <see cref="Training.ModelSession"/> has a value it cannot take. <see cref="Option"/> is the property's name
/// ("BatchSize", "Rank", "Model", …) and <see cref="Detail"/> what is wrong, starting with the value; the message is
/// "Option Detail". A front end names the setting in its own terms from <see cref="Option"/> (the CLI's one table of
/// flags, OptionFlags) and prints <see cref="Detail"/> after it, never parsing the message.
/// </summary>
public class OptionException(string option, string detail, Exception? inner = null) : ArgumentException(Format(option, detail), inner)
{
    /// <summary>"name detail", without the space before a detail that starts with ':' (an option with no value to show).</summary>
    public static string Format(string name, string detail) => detail.StartsWith(':') ? name + detail : $"{name} {detail}";

    /// <summary>The option's property name (for LoRA settings the <see cref="Modules.LoraSettings"/> property: "Rank", "Alpha", …).</summary>
    public string Option { get; } = option;

    /// <summary>What is wrong, starting with the value (e.g. "0: must be positive").</summary>
    public string Detail { get; } = detail;

    /// <summary>The option's property name, as <see cref="ArgumentException.ParamName"/> for code that catches argument errors.</summary>
    public override string? ParamName => Option;
}
