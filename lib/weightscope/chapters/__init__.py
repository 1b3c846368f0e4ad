"""Stage 5, chapters: one call per chapter step, owning its parameters, caching and derived tables.

CHAPTERS maps each notebook to the module whose `Config` checks its parameters (`Config(**params)` raises
`ParamsError` listing every problem; `Config.problems(dims)` adds the checks that need the model's sizes,
from `model.cfg` or the pre-flight's `ModelDims`).

SKIPPABLE maps each chapter that does not apply to every target to the module whose `skip_reason(target,
dims)` says why it does not apply to this one (None when it does); the book runner then leaves it out,
printing the reason, instead of failing, and with it every chapter that reads its tables (`TableInput`). A
registered module may also define `target_problems(target, dims)`: its checks of the target's own inputs
(e.g. chapter 4's attention SAEs), run by the pre-flight.
"""

CHAPTERS = {
    "01_output_tokens": "weightscope.chapters.output_tokens",
    "02_attention": "weightscope.chapters.attention",
    "03_semantic_populations": "weightscope.chapters.populations",
    "04_attention_saes": "weightscope.chapters.attention_saes",
    "05_context_neurons": "weightscope.chapters.context_neurons",
    "06_ffkv_baseline": "weightscope.chapters.ffkv",
    "07_in_context": "weightscope.chapters.in_context",
}

SKIPPABLE = {
    "02_attention": "weightscope.chapters.attention",
    "04_attention_saes": "weightscope.chapters.attention_saes",
    "05_context_neurons": "weightscope.chapters.context_neurons",
    "06_ffkv_baseline": "weightscope.chapters.ffkv",
}
