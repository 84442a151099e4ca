"""The embedded corpus, its fixed splits and the local lm-eval tasks built from them (``evals/``)."""
