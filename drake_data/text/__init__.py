"""DRAKE-text: a text-only benchmark for federations of real pretrained LLMs (see builder)."""
