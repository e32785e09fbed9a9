"""The torch side of `export.build`: load and patch the model (`pipeline`), the build's graphs as torch modules
(`graphs`, `segments`), their ONNX export, and their verification against PyTorch (`verify`, `quality`,
`runners`). `--from-onnx` on a device never imports this package."""
