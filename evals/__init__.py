"""mxq's local lm-eval tasks, importable as ``mxq.evals`` so an installed wheel carries them."""
