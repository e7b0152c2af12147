"""The model engine: weights, tokenizer, model code, KV caches and sampling. Runs a slice of
layers on one machine and knows nothing of the network."""
