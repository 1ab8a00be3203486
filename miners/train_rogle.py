"""`python -m miners.train_rogle --pairs SHARDS`: the ROGLE training command (implemented in
miners/training/rogle.py; this module is its stable entry point)."""

from miners.training.rogle import main

if __name__ == "__main__":
    raise SystemExit(main())
