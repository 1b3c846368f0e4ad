"""Stage 3, preparation: inputs the project makes itself (the demo SAEs, trained once with sae-lens)."""
