"""Compiler backends: the same job in, the same TorchScript `model.neuron` file out.

`neuron` calls torch_neuronx.trace (the product); `cpu` calls torch.jit.trace so every other step
runs for real on machines without the Neuron SDK. `select` picks one. Nothing is imported here.
"""
