"""Model zoo (filled in by models/resnet.py, models/wide.py, models/preact.py)."""
