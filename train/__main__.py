"""`python -m train ...` (also what `accelerate launch -m train` runs)."""

from train.cli import entry

if __name__ == "__main__":  # vLLM spawns worker processes that re-import the main module
    entry()
