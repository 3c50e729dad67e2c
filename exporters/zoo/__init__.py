"""Video architectures written by us, in PyTorch and Keras, width/depth configurable."""
