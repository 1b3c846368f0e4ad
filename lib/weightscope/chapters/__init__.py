"""Stage 5, chapters: one call per chapter step, owning its parameters, caching and derived tables.

CHAPTERS maps each notebook to the module whose `Config` checks its parameters (`Config(**params)` raises
`ParamsError` listing every problem; `Config.problems(dims)` adds the checks that need the model's sizes, from `model.cfg` or the pre-flight's `ModelDims`).
"""

CHAPTERS = {
    "01_output_tokens": "weightscope.chapters.output_tokens",
    "02_attention": "weightscope.chapters.attention",
    "03_semantic_populations": "weightscope.chapters.populations",
}
