"""`python -m gpuctl`: the same as the gpuctl console script."""

from gpuctl.cli import main

main()
