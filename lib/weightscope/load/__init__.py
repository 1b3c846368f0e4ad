"""Stage 2, loading: model weights (llama2.c, Hugging Face safetensors, TransformerLens), tokenizers and SAEs.

Loading has no side effects: nothing here trains or writes results (the demo SAEs are made by `prepare`).
"""
