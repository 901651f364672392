"""Tools for the paper's second method: context-dependency scores and [IND] fine-tuning."""
