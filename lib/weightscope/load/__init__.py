"""Stage 2, loading: where a model comes from (sources), its weights (checkpoints: streaming safetensors and
the model's facts from config.json; llama2c: the demo model's files), tokenizers (tokenizer), the
weights-only model of chapters 1–3 (weights_model), full models for forward passes (hooked, models), SAEs
(saes, sae_sequence) and corpora.

The modules import one another in one direction, at the top of the file (tests/test_layout.py checks that
there is no cycle): checkpoints, llama2c -> tokenizer, sources -> weights_model, hooked -> models.
Loading has no side effects: nothing here trains or writes results (the demo SAEs are made by `prepare`).
"""
