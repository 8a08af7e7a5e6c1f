"""Which tensors make, shift and read each activation site's units: one model (`wiring.model`) and one
reader per backend graph (`wiring.onnx` over `wiring.onnx_index`; `wiring.torch` for nn.Modules and
ExportedProgram graphs)."""
