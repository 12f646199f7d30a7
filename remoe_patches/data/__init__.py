"""Training data: datasets, the demo corpus, domains, preprocessing, tokenizers."""
