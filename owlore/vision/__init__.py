"""Vision-language training: ``llava`` (a LLaVA around any causal LM, a from-scratch tower, the grid-question
collator) and ``align`` (tower + projector alignment before the language model trains)."""
