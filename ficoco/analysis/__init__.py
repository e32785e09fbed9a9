"""Analysis of a FiCoCo build from a shape-only config (no weights, no torch): FLOPs (`flops`) and the
memory plan (`memory`). Both read the build plan (`ficoco.plan`)."""
