"""Training the embedded reference model (mxq/assets/tiny): tokenizer, data, losses, MXFP4 QAT, the run itself.

``python -m mxq.train.tokenizer OUT_DIR`` trains the BPE; ``python -m mxq.train`` trains the model.
"""
