"""PEFT methods: which tensors of a model train, which travel and which stay on the client."""
