"""What ``hf-dspark eval`` measures, as a library: prompt sets, timed runs, summaries, plots.

- :mod:`~hf_dspark.evaluation.prompt_sets`: prompt files, the Hub benchmarks ``--dataset`` knows and
  the final-number answer check;
- :mod:`~hf_dspark.evaluation.measure`: one timed ``generate`` call and the record built from it;
- :mod:`~hf_dspark.evaluation.summary`: tau, speed-ups and bootstrap intervals per prompt set, the
  resumable results file and the merge of shards;
- :mod:`~hf_dspark.evaluation.plots`: the PNG plots.

The command itself (its flags, the loop over prompts and methods) is :mod:`hf_dspark.commands.eval`.
"""

from hf_dspark.evaluation.measure import Measurement, fused_plain_kwargs, greedy_divergence, measure_generate
from hf_dspark.evaluation.plots import write_plots
from hf_dspark.evaluation.prompt_sets import (
    DATASETS,
    HubPromptSet,
    PromptSet,
    alpaca_row,
    extract_final_number,
    gsm8k_row,
    humaneval_row,
    load_dataset_prompts,
    math500_row,
    mbpp_row,
    mt_bench_row,
    read_prompt_file,
)
from hf_dspark.evaluation.summary import (
    EvalResults,
    answer_quality,
    bootstrap_ci,
    macro_average,
    merge_results,
    summarize_prompt_set,
)

__all__ = [
    "DATASETS", "EvalResults", "HubPromptSet", "Measurement", "PromptSet", "alpaca_row", "answer_quality",
    "bootstrap_ci", "extract_final_number", "fused_plain_kwargs", "greedy_divergence", "gsm8k_row",
    "humaneval_row", "load_dataset_prompts", "macro_average", "math500_row", "mbpp_row", "measure_generate",
    "merge_results", "mt_bench_row", "read_prompt_file", "summarize_prompt_set", "write_plots",
]
