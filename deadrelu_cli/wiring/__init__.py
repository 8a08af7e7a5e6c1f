"""Which tensors make, shift and read each activation site's units: one model (`wiring.model`) and one
reader per backend graph (`wiring.onnx`; torch modules and programs in `wiring.torch`)."""
