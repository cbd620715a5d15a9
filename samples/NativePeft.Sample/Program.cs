// Fine-tune the built-in model on the built-in task (upper: word -> WORD) with QLoRA, from C#.
// The host owns the logging: the trainer writes its steps and evaluations to this ILogger.
using Microsoft.Extensions.Logging;
using NativePeft.Modules;
using NativePeft.Planning;
using NativePeft.Training;

string outDir = args.Length > 0 ? args[0] : "sample-out";
int steps = args.Length > 1 ? int.Parse(args[1]) : 300;

using var loggerFactory = LoggerFactory.Create(b => b.AddSimpleConsole(o => o.SingleLine = true));
var logger = loggerFactory.CreateLogger("sample");

var options = new FineTuneOptions
{
    Model = "builtin",               // or a Hugging Face Llama folder
    Data = "builtin",                // or a JSONL / text file
    Method = FineTuneMethod.Qlora,   // Full, Lora (bf16 base) or Qlora (NF4 base)
    Lora = new LoraSettings { Rank = 16, Alpha = 32, TargetModules = LoraSettings.KnownTargets },
    Steps = steps, BatchSize = 16, SeqLen = 24, Lr = 3e-3, WarmupSteps = 15,
    OutputDir = outDir,              // checkpoints and metrics.json
};

using var run = FineTune.Create(options, logger);
var before = run.Evaluate();
var result = run.Train();
string adapter = run.SaveAdapter(Path.Combine(outDir, "my-adapter"));
logger.LogInformation("eval loss {Before:F4} -> {After:F4}, exact match {Exact:P0}; adapter: {Adapter}",
    before.Loss, result.FinalEval!.Loss, result.FinalEval.ExactMatch, adapter);
return 0;
