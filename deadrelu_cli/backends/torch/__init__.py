"""The torch backend: probes on nn.Modules, .pt2 programs and TorchScript; fixes of their tensors."""
