"""``python -m core`` runs the dyngan CLI (``torchrun -m core train ...`` needs it)."""

from .cli import main

if __name__ == "__main__":
    main()
