"""Training machinery: needs transformers, trl and datasets; imports the math, never cli/ or experiments/."""
