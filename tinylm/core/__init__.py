"""The model and everything it is made of: the layer pairs (the lesson), the layer sets that run
them (NumPy reference, fast CPU, CUDA kernels), the optimiser, sampling, tokenizer, checkpoints'
format. Imports nothing from train/, rlhf/, experiments/ or commands/."""
