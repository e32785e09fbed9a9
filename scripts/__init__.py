"""Command-line tools around FiCoCo: FLOPs (`flops.py`), pictures (`visualize.py`), accuracy (`eval.py`)."""
