"""``python -m lightning_ebm``: the ``lightning-ebm`` console script."""

from .console import main

main()
