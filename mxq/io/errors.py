"""``ExportError``: a checkpoint or plan that an export target cannot write faithfully."""


class ExportError(ValueError):
    """Raised before anything is written; the message names the target, the layer or tensor, and the options."""
