"""Stage 6, publishing: the book runner (papermill + Jupyter Book), figures and tables for the pages."""
