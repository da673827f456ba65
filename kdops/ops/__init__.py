"""One module per loss family: argument checks, the ``torch.library`` custom op and its autograd."""
