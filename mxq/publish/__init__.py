"""Publishing a run: the model card of its export (``card``) and a self-contained HTML report (``html``)."""
