"""Stage 2, loading: where a model comes from (sources), its weights (checkpoints: streaming safetensors;
llama2c), the weights-only model of chapters 1–3 (weights_model), full models for forward passes (models),
tokenizers and SAEs (saes, sae_sequence).

Loading has no side effects: nothing here trains or writes results (the demo SAEs are made by `prepare`).
"""
