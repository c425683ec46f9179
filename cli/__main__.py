"""`python -m hita.cli ...` (and `torchrun -m hita.cli ...`): the same app as the `hita` script."""
from hita.cli.app import main

if __name__ == "__main__":
    main()
